"""Your task, your model: task files, data set folders, and every chapter on a task file of generation records with a Qwen2 base."""
import json
import shutil
from pathlib import Path

from conftest import slmops
from slmops_nb.data import Task, load_task, task_from_params

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ("01_introduction", "02_distillation", "03_finetuning", "04_deployment")
SHORT = ("-p", "eval_limit=24", "-p", "unlabeled_size=150")  # generation is slow to score: fewer test answers, a smaller pool


def _metrics(out) -> dict:
    return {ch: json.loads((out/ch/"metrics.json").read_text()) for ch in CHAPTERS}


def test_a_task_file_is_the_same_task_as_the_data_parameters(tmp_path, intents_csv):
    (tmp_path/"intents.csv").write_bytes(intents_csv.read_bytes())
    (tmp_path/"intents.yaml").write_text("train_file: intents.csv\ninput_column: utterance\nlabel_column: intent\n")
    assert load_task(tmp_path/"intents.yaml") == Task(str(tmp_path/"intents.csv"), input_column="utterance", label_column="intent")
    assert task_from_params(str(tmp_path/"intents.yaml")).classes == ["book_flight", "book_hotel", "play_music", "set_alarm"]


def test_a_task_reads_the_splits_of_a_data_set_folder(tmp_path, intents_csv):
    "A folder in the hub's layout (a data file per split), read by `datasets` split by split, as a hub data set is."
    import csv
    rows = list(csv.DictReader(intents_csv.open()))
    (tmp_path/"ds").mkdir()
    for split, part in (("train", rows[::3] + rows[1::3]), ("validation", rows[2::6]), ("test", rows[5::6])):
        with open(tmp_path/"ds"/f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["id", "utterance", "intent"]); w.writeheader(); w.writerows(part)
    ds = str(tmp_path/"ds")
    task = Task(ds, validation_file=ds, test_file=ds, input_column="utterance", label_column="intent")
    assert {s: len(r) for s, r in task.splits().items()} == {"train": 80, "validation": 20, "test": 20}
    assert [r["utterance"] for r in task.splits()["test"]] == [r["utterance"] for r in rows[5::6]]


def test_every_chapter_on_a_task_file_of_generation_records_and_a_qwen2_base(tmp_path, numbers_jsonl, qwen_dir):
    """slmops run -p task_file=numbers.yaml: JSONL input/output records (kind generation) by a YAML file with a system prompt and a
    relative path, on a Qwen2 ChatML base; every chapter runs, everything is scored by chrF and ROUGE-L."""
    (tmp_path/"data").mkdir(); shutil.copy(numbers_jsonl, tmp_path/"data"/"numbers.jsonl")
    (tmp_path/"numbers.yaml").write_text("# numbers in words\ntrain_file: data/numbers.jsonl\ninput_column: input\n"
                                         "label_column: output\nkind: generation\nsystem_prompt: You write numbers in words.\n")
    out = tmp_path/"run"
    r = slmops("run", "--profile", "smoke", "-p", "task_file=numbers.yaml", "-p", f"base_model={qwen_dir}",
               "-p", "methods=['lora', 'qlora', 'olive_lora']", *SHORT, "--out", out, "--no-progress", "--nbs", ROOT/"nbs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(out)
    for ch in CHAPTERS:
        assert m[ch]["task"]["train_file"] == str(tmp_path/"data"/"numbers.jsonl") and m[ch]["task"]["kind"] == "generation", ch
        assert m[ch]["task"]["system_prompt"] == "You write numbers in words." and m[ch]["task"]["classes"] == [], ch
    assert "chrf" in m["01_introduction"]["teacher_test_scores"] and m["02_distillation"]["metric"] == "chrf"
    assert {"teacher_chrf", "student_seq_kd_chrf", "retention"} <= set(m["02_distillation"])
    for name, s in m["03_finetuning"]["methods"].items():
        assert {"exact_match", "chrf", "bleu", "rougeL", "perplexity"} <= set(s) and 0 <= s["chrf"] <= 100, name
    for name, v in m["04_deployment"]["variants"].items():
        assert {"chrf", "rougeL", "tokens_per_second"} <= set(v), name
    assert any("chrf within 1 point of fp32" in k for k in m["04_deployment"]["checklist"])
    synthetic = [json.loads(l) for l in (out/"02_distillation"/"synthetic.jsonl").read_text().splitlines()]
    assert synthetic and {"input", "output", "confidence"} <= set(synthetic[0])
    assert m["01_introduction"]["base_model"] == str(qwen_dir) and m["03_finetuning"]["base_model"] == str(qwen_dir)
    assert m["04_deployment"]["foundry_local"]["loaded"] and m["04_deployment"]["server"]["errors"] == 0
    assert json.loads((out/"03_finetuning"/"merged"/"config.json").read_text())["model_type"] == "qwen2"
    ops = json.loads((out/"05_operations"/"metrics.json").read_text())  # operations on a generation task: chrF by window
    assert ops["metric"] == "chrf" and ops["task"] == m["04_deployment"]["task"] and ops["server"]["errors"] == 0


def test_a_task_in_farsi_and_ukrainian_is_learned(tmp_path, tickets_files):
    """Support tickets in a right-to-left script and a Cyrillic one, labels in their own language, through the chapters that train
    (smoke): the workbench reads them with a tokenizer of their own, the students and the fine-tuned methods learn them (above
    chance), no chapter warns, and the plots and the pages show the script."""
    import nbformat
    from nbconvert import HTMLExporter
    (tmp_path/"tickets.yaml").write_text("".join(f"{s}_file: {f}\n" for s, f in tickets_files.items())
                                         + "input_column: text\nlabel_column: category\n")
    out = tmp_path/"run"
    r = slmops("run", "01", "02", "03", "--profile", "smoke", "-p", "task_file=tickets.yaml", "--out", out, "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out/"summary.json").read_text())
    assert [c["status"] for c in summary["chapters"]] == ["ok"] * 3, [c["metrics"].get("warnings") for c in summary["chapters"]]
    m = {ch: json.loads((out/ch/"metrics.json").read_text()) for ch in CHAPTERS[:3]}
    reads, chance = m["01_introduction"]["task_reading"], 0.25  # four balanced categories
    assert reads["own_tokenizer"] and reads["base_tokens_per_char"] < reads["tokens_per_char"] / 3, reads
    assert m["01_introduction"]["teacher_test_accuracy"] >= 0.9
    students = {k: v for k, v in m["02_distillation"].items() if k.startswith("student_") and k.endswith("_accuracy")}
    assert len(students) == 3 and min(students.values()) > chance, students
    methods = {k: v["accuracy"] for k, v in m["03_finetuning"]["methods"].items()}
    assert min(methods["lora"], methods["qlora"], methods["full"]) > chance, methods
    assert sum(v > chance for v in methods.values()) >= len(methods) / 2, methods  # in smoke's 32 steps, Olive's recipe and IA³ lag
    labels = ["پرداخت", "ارسال", "оплата", "доставка"]
    for ch in CHAPTERS[:3]:  # matplotlib found a glyph for every character it drew
        executed = (out/ch/f"{ch}.ipynb").read_text()
        assert "missing from font" not in executed and "missing from current font" not in executed, ch
    assert (out/"01_introduction"/"teacher_confusion.png").exists() and (out/"01_introduction"/"label_distribution.png").exists()
    page, _ = HTMLExporter().from_notebook_node(nbformat.read(out/"01_introduction"/"01_introduction.ipynb", as_version=4))
    assert all(label in page for label in labels)  # the page shows the labels in their script


def test_a_bad_task_file_is_refused_before_anything_runs(tmp_path):
    out = tmp_path/"run"; out.mkdir(); (out/"keep.txt").write_text("earlier results")
    (tmp_path/"bad.yaml").write_text("train_file: missing.csv\ninput_colum: text\n")
    r = slmops("run", "-p", f"task_file={tmp_path/'bad.yaml'}", "--out", out)
    assert r.returncode == 2 and "unknown key(s) ['input_colum']" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path/"bad.yaml").write_text("train_file: missing.csv\n")
    r = slmops("run", "-p", f"task_file={tmp_path/'bad.yaml'}", "--out", out)
    assert r.returncode == 2 and f"{tmp_path/'missing.csv'}: file not found" in r.stderr, r.stderr
    r = slmops("run", "-p", f"task_file={tmp_path/'bad.yaml'}", "-p", "label_column=intent", "--out", out)
    assert r.returncode == 2 and "both set" in r.stderr, r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
