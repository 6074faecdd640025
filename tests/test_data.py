import filecmp
import json
import re
from collections import Counter

import pytest

from slmops_nb.core import SlmopsError

from slmops_nb.data import (DATA_DIR, SPLIT_FRACTIONS, TONE_TEMPLATE, TONES, WORKBENCH_FILES, DataError, Task, instruction_split, load_records,
    render_template, stratified_split, tone_split, workbench_records)
from slmops_nb.datagen import generate_workbench_data


def test_shipped_data_is_rebuilt_byte_identically(tmp_path):
    generate_workbench_data(tmp_path)
    for f in WORKBENCH_FILES:
        assert filecmp.cmp(tmp_path/f, DATA_DIR/f, shallow=False), f


def test_workbench_data_shape():
    splits = {s: tone_split(s) for s in SPLIT_FRACTIONS}
    n = sum(len(v) for v in splits.values())
    assert len(TONES) >= 6 and n >= 3000 and 0.10 <= len(splits["validation"]) / n <= 0.20
    for s, recs in splits.items():  # stratified: every split has every tone, in about the same share
        share = Counter(r["tone"] for r in recs)
        for t in TONES:
            assert abs(share[t] / len(recs) - sum(r["tone"] == t for v in splits.values() for r in v) / n) < 0.01
    kinds = Counter(r["kind"] for v in splits.values() for r in v)
    assert {"plain", "negation", "distractor", "ambiguous"} <= set(kinds)
    pool = workbench_records("unlabeled")
    assert len(pool) >= 5000 and all(set(r) == {"phrase"} for r in pool)
    seen = [r["phrase"] for v in splits.values() for r in v] + [r["phrase"] for r in pool]
    assert len(seen) == len(set(seen))  # no phrase in two places: the test split is unseen
    qa = [r for s in SPLIT_FRACTIONS for r in instruction_split(s)]
    assert len(qa) >= 1000 and all(r["question"] and r["answer"] for r in qa)
    words = {w.lower() for r in splits["train"] for w in re.findall(r"[A-Za-z']+", r["phrase"])}
    assert len(words) > 400 and len({" ".join(r["phrase"].split()[:2]) for r in splits["train"]}) > 300  # real variety


@pytest.fixture
def files(tmp_path):
    (tmp_path/"ok.jsonl").write_text('{"phrase": "Wow!", "tone": "surprise"}\n')
    (tmp_path/"ok.json").write_text(json.dumps([{"phrase": "Ugh.", "tone": "anger"}]))
    (tmp_path/"ok.csv").write_text('phrase,tone\n"Oh no, the storm",fear\n')
    return tmp_path


def test_loaders_read_json_jsonl_csv(files):
    assert load_records(files/"ok.jsonl", columns=["phrase", "tone"])[0]["tone"] == "surprise"
    assert load_records(files/"ok.json")[0]["tone"] == "anger"
    assert load_records(files/"ok.csv") == [{"phrase": "Oh no, the storm", "tone": "fear"}]


@pytest.mark.parametrize("content,name,match", [
    (None, "missing.jsonl", r"missing\.jsonl: file not found"),
    ('{"phrase": "a"}\n', "cols.jsonl", r"missing column\(s\) \['tone'\]; columns found: \['phrase'\]"),
    ("\n\n", "empty.jsonl", r"empty\.jsonl: the data set is empty"),
    ('{"phrase": "a", "tone": "joy"}\n{"phrase": \n', "bad.jsonl", r"bad\.jsonl:2: unreadable line"),
    ("[1, 2]", "list.json", r"list\.json: expected a list of JSON objects"),
    ('{"phrase": "a",}', "broken.json", r"broken\.json: unreadable JSON at line 1"),
    ('phrase,tone\na,joy,extra\n', "extra.csv", r"extra\.csv:2: row has 3 fields, the header has 2 \(phrase, tone\); quote fields"),
    ('phrase,tone\na\n', "short.csv", r"short\.csv:2: row has 1 fields, the header has 2 \(phrase, tone\)"),
    ("phrase\tjoy", "data.tsv", r"unsupported file type '\.tsv'"),
])
def test_bad_input_names_file_and_problem(tmp_path, content, name, match):
    p = tmp_path/name
    if content is not None: p.write_text(content)
    before = p.read_bytes() if p.exists() else None
    with pytest.raises(DataError, match=match):
        load_records(p, columns=["phrase", "tone"])
    assert (p.read_bytes() if p.exists() else None) == before  # nothing written or damaged


def test_non_utf8_file(tmp_path):
    (tmp_path/"latin.jsonl").write_bytes('{"phrase": "caf\xe9", "tone": "joy"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(tmp_path/"latin.jsonl")


def test_hub_name_offline_gives_clear_error():
    with pytest.raises(DataError, match="Offline, give a local"):
        load_records("nobody/no-such-dataset")


def test_templates():
    assert render_template([{"phrase": "Hi", "tone": "joy"}], TONE_TEMPLATE) == ["<|user|>Hi\n<|assistant|>joy"]
    with pytest.raises(DataError, match=r"no column\(s\) \['tone'\].*columns found: \['phrase'\]"):
        render_template([{"phrase": "Hi"}], TONE_TEMPLATE, where="x.jsonl")
    with pytest.raises(DataError, match="uses no column"):
        render_template([{"phrase": "Hi"}], "constant text")


def test_stratified_split():
    recs = [{"y": "a"}] * 80 + [{"y": "b"}] * 20
    s = stratified_split(recs, "y", {"train": 0.8, "test": 0.2}, seed=1)
    assert Counter(r["y"] for r in s["test"]) == {"a": 16, "b": 4}
    with pytest.raises(DataError, match="no column 'label'"):
        stratified_split(recs, "label")
    with pytest.raises(SlmopsError, match="sum to 1"):
        stratified_split(recs, "y", {"train": 0.5})


def test_task_never_mixes_the_builtin_data_with_yours(intents_csv):
    "Only a train file: validation and test are carved from it (stratified), never taken from the tones."
    task = Task(str(intents_csv), input_column="utterance", label_column="intent")
    splits = task.splits()
    assert {s: len(r) for s, r in splits.items()} == {"train": 88, "validation": 16, "test": 16}  # 30 a label: 22 + 4 + 4
    assert all(set(r) == {"id", "utterance", "intent"} for rs in splits.values() for r in rs)
    assert task.classes == ["book_flight", "book_hotel", "play_music", "set_alarm"]
    ids = [r["id"] for rs in splits.values() for r in rs]
    assert len(ids) == len(set(ids)) == 120  # every record in one split only
    assert Task(str(intents_csv), test_file=str(intents_csv), input_column="utterance", label_column="intent").splits()["test"] \
        == load_records(intents_csv)


@pytest.mark.parametrize("kw,match", [
    (dict(input_column="utterance", label_column="intent"), "set train_file"),
    (dict(validation_file="v.csv"), "validation_file is set but train_file is not"),
])
def test_partial_data_parameters_are_refused(kw, match):
    with pytest.raises(DataError, match=match): Task(**kw)


@pytest.mark.parametrize("csv,match", [
    ("utterance,intent\nbook a flight,book_flight\nplay jazz,\n", r"record 2 has an empty 'intent'"),
    ("utterance,intent\n ,book_flight\nplay jazz,play_music\n", r"record 1 has an empty 'utterance'"),
    ("utterance,intent\nbook a flight,book_flight\nbook a room,book_flight\n", r"a classification task needs at least two labels"),
    ('utterance,intent\nbook a flight,"book\nflight"\nplay jazz,play_music\n', r"holds a newline"),
    ("utterance,label\nbook a flight,book_flight\n", r"missing column\(s\) \['intent'\]"),
])
def test_bad_task_data_is_refused_naming_file_and_record(tmp_path, csv, match):
    (tmp_path/"t.csv").write_text(csv)
    with pytest.raises(DataError, match=match):
        Task(str(tmp_path/"t.csv"), input_column="utterance", label_column="intent").splits()
