"""Test setup: offline, run folders in a temporary folder, the workbench cache under .cache/test."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SLMOPS_CACHE", str(ROOT/".cache"/"test"))
SLMOPS = str(Path(sys.executable).parent/"slmops")  # the console script of this environment


def _network_cut() -> list[str]:
    "A command prefix that runs a command in a network namespace of its own, loopback only, where the machine allows it (root)."
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")): return []
    prefix = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    return prefix if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0 else []


NETWORK_CUT = _network_cut()


def slmops(*args, cwd=ROOT, **kw) -> subprocess.CompletedProcess:
    "`slmops ARGS` with the network cut where the machine allows it: a run that calls a registry or a hub fails its test."
    return subprocess.run([*NETWORK_CUT, SLMOPS, *map(str, args)], capture_output=True, text=True, cwd=cwd, **kw)


# pytest-xdist hands each process two tests to start with (the 1st and 2nd to one, the 3rd and 4th to the other), then one
# test at a time. From a cold cache: the smoke run builds the tones' base and teacher, then nbdev_test uses them; the other
# process first runs the Phi-3 and Gemma runs, which need neither, so that the Qwen2 run and the run on your data (which
# need the base) start once it is built instead of waiting for it.
LONG = ("test_whole_workbook_smoke_run", "test_nbdev_test_passes", "test_another_family_end_to_end",
        "test_every_chapter_on_a_task_file", "test_every_chapter_on_your_own_data", "test_a_task_in_farsi_and_ukrainian")


def pytest_collection_modifyitems(items):
    "The whole-workbook runs first: with a test process per core (make test), the long ones start at once and the short ones fill in."
    items.sort(key=lambda item: next((i for i, name in enumerate(LONG) if item.name.startswith(name)), len(LONG)))


def copy_project(dst: Path) -> Path:
    "The files nbdev and the docs read (settings, setup, README, _quarto.yml, nbs/, the library) copied to `dst`."
    import shutil
    dst.mkdir(parents=True)
    for f in ("settings.ini", "setup.py", "README.md", "_quarto.yml"): shutil.copy(ROOT/f, dst/f)
    shutil.copytree(ROOT/"nbs", dst/"nbs", symlinks=True, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(ROOT/"slmops_nb", dst/"slmops_nb", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture
def project(tmp_path) -> Path:
    "A copy of the project in the test's temporary folder, for commands that write into it (nbdev, JupyterLab saves)."
    return copy_project(tmp_path/"proj")


@pytest.fixture(autouse=True)
def runs_root(tmp_path, monkeypatch):
    "Every test writes run folders into its own temporary folder, never into the repository."
    monkeypatch.setenv("SLMOPS_RUNS_ROOT", str(tmp_path/"runs"))
    return tmp_path/"runs"


INTENTS = {"book_flight": ["book a flight to {c}", "I need a plane ticket to {c}", "fly me to {c} on friday"],
           "book_hotel": ["book a hotel in {c}", "find me a room in {c}", "I need a hotel near {c} station"],
           "play_music": ["play some jazz from {c}", "put on music from {c}", "play the top songs in {c}"],
           "set_alarm": ["wake me up before the {c} meeting", "set an alarm for the {c} call", "alarm at 7 for {c}"]}
CITIES = ["Paris", "Oslo", "Lima", "Rome", "Kyoto", "Cairo", "Quito", "Bern", "Dakar", "Perth"]


@pytest.fixture(scope="session")
def intents_csv(tmp_path_factory) -> Path:
    "A user's own classification data: a CSV with columns id, utterance, intent (labels that start alike)."
    import csv
    path = tmp_path_factory.mktemp("intents")/"intents.csv"
    rows = [(u.format(c=c), label) for label, us in INTENTS.items() for u in us for c in CITIES]
    with open(path, "w", newline="") as f:
        w = csv.writer(f); w.writerow(["id", "utterance", "intent"])
        w.writerows((i, u, l) for i, (u, l) in enumerate(rows))
    return path


@pytest.fixture(scope="session")
def intents_files(intents_csv) -> dict[str, Path]:
    "The same intents as three CSV files: train, validation and test (rows 9 and 10 of every ten held out)."
    import csv
    rows = list(csv.DictReader(intents_csv.open()))
    parts = {"train": [r for i, r in enumerate(rows) if i % 10 < 8], "validation": rows[8::10], "test": rows[9::10]}
    for split, part in parts.items():
        with open(intents_csv.with_name(f"intents_{split}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, ["id", "utterance", "intent"]); w.writeheader(); w.writerows(part)
    return {split: intents_csv.with_name(f"intents_{split}.csv") for split in parts}


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    "A tiny random-initialised Qwen2 folder with a ChatML tokenizer (pad <|endoftext|> = 0, eos <|im_end|> = 2)."
    from slmops_nb.models import tiny_model
    return tiny_model(tmp_path_factory.mktemp("models")/"qwen2-chatml")


ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
        "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _words(n: int) -> str:
    if n < 20: return ONES[n]
    if n < 100: return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    return ONES[n // 100] + " hundred" + (" and " + _words(n % 100) if n % 100 else "")


@pytest.fixture(scope="session")
def numbers_jsonl(tmp_path_factory) -> Path:
    "A user's own generation data in the source material's format: JSONL records of input and output (numbers in words)."
    import json
    path = tmp_path_factory.mktemp("numbers")/"numbers.jsonl"
    path.write_text("".join(json.dumps({"input": f"Write {n} in words.", "output": _words(n)}) + "\n" for n in range(1, 200)))
    return path


# A user's own support tickets in two scripts: Farsi (right to left) and Ukrainian (Cyrillic), each answered by a category in
# its own language. Templates and fillers, combined deterministically: 600 train, 100 validation and 160 test records.
TICKETS = {
    "پرداخت": ["پرداخت من با کارت {fa_bank} انجام نشد و {n} تومان از حسابم کم شد",
               "چرا مبلغ سفارش {order} دو بار از حساب من برداشت شده است؟",
               "می‌خواهم هزینه سفارش {order} را با {fa_method} بپردازم",
               "درگاه بانکی هنگام پرداخت خطا می‌دهد و سفارش {order} ثبت نمی‌شود",
               "لطفاً {n} تومان را به کارت {fa_bank} من برگردانید",
               "کد تخفیف اعمال نشد و برای سفارش {order} بیشتر پرداخت کردم"],
    "ارسال": ["بسته سفارش {order} هنوز به {fa_city} نرسیده است",
              "سفارش من کی به آدرس {fa_city} فرستاده می‌شود؟",
              "پیک امروز نیامد، سفارش {order} کجاست؟",
              "کد رهگیری مرسوله {order} در سایت پست کار نمی‌کند",
              "لطفاً آدرس تحویل سفارش {order} را به {fa_city} تغییر دهید",
              "مرسوله به {fa_city} چند روز در راه است؟"],
    "оплата": ["Не можу оплатити замовлення {order} карткою {uk_bank}",
               "З моєї картки двічі списали {n} гривень за замовлення {order}",
               "Поверніть, будь ласка, {n} гривень на картку {uk_bank}",
               "Платіж через {uk_method} не проходить, що робити?",
               "Гроші списано, але рахунок {order} досі не сплачено",
               "Промокод не зменшив суму до сплати за замовлення {order}"],
    "доставка": ["Посилка {order} ще не прибула до міста {uk_city}",
                 "Коли кур'єр привезе замовлення {order} у {uk_city}?",
                 "Трек-номер відправлення {order} не відстежується",
                 "Змініть, будь ласка, адресу отримання на {uk_city}",
                 "Скільки днів їде посилка до {uk_city}?",
                 "Кур'єр сьогодні не приїхав, де моє замовлення {order}?"]}
TICKET_FILLERS = {"fa_bank": ["ملت", "ملی", "سامان", "پاسارگاد", "تجارت"], "fa_method": ["کیف پول", "کارت به کارت", "اقساط"],
                  "fa_city": ["تهران", "شیراز", "اصفهان", "تبریز", "مشهد", "رشت", "یزد", "کرمان"],
                  "uk_bank": ["ПриватБанку", "Монобанку", "Ощадбанку", "Райффайзену"],
                  "uk_method": ["Apple Pay", "Google Pay", "банківський переказ"],
                  "uk_city": ["Київ", "Львів", "Одеса", "Харків", "Дніпро", "Полтава", "Чернігів", "Ужгород"]}


@pytest.fixture(scope="session")
def tickets_files(tmp_path_factory) -> dict[str, Path]:
    "Support tickets in Farsi and Ukrainian (JSONL: text, category): train, validation and test files, four balanced categories."
    import json
    import random
    rnd, folder = random.Random(0), tmp_path_factory.mktemp("tickets")
    def ticket(category: str) -> dict:
        fill = {k: rnd.choice(v) for k, v in TICKET_FILLERS.items()} | {"order": rnd.randint(10000, 99999), "n": rnd.randint(2, 90) * 1000}
        return {"text": rnd.choice(TICKETS[category]).format(**fill), "category": category}
    files = {}
    for split, n in (("train", 600), ("validation", 100), ("test", 160)):
        files[split] = folder/f"tickets_{split}.jsonl"
        files[split].write_text("".join(json.dumps(ticket(c), ensure_ascii=False) + "\n" for _ in range(n // 4) for c in TICKETS))
    return files
