import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slmops_nb import models as wb
from slmops_nb.evaluate import accuracy, classify, generate
from slmops_nb.measure import model_size
from slmops_nb.train import encode_chats
from slmops_nb.core import SlmopsError, artifact_info
from slmops_nb.data import TONES, tone_split

TINY = {"arch": wb._llama(32, 1, 2, 1, 64), "data": "tones",
        "train": {"epochs": 0.05, "lr": 1e-3, "batch_size": 16, "max_length": 64}, "seed": 3}


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    "A tiny workbench model spec, built into an empty cache."
    monkeypatch.setitem(wb.MODEL_SPECS, "tiny", TINY)
    monkeypatch.setenv("SLMOPS_CACHE", str(tmp_path/"cache"))
    return tmp_path/"cache"


def test_builds_from_nothing_then_loads_from_cache(tiny):
    p = wb.workbench_path("tiny")
    assert (p/"model.safetensors").exists() and (p/"tokenizer.json").exists() and (p/"train_log.json").exists()
    assert sorted(d.name for d in tiny.iterdir()) == ["model-tiny", "tokenizer"]
    mtime = (p/"model.safetensors").stat().st_mtime
    assert wb.workbench_path("tiny") == p and (p/"model.safetensors").stat().st_mtime == mtime
    m = wb.load_model("workbench:tiny")
    assert type(m).__name__ == "LlamaForCausalLM" and m.config.hidden_size == 32
    assert artifact_info(p)["spec"]["arch"]["hidden_size"] == 32


def test_same_seed_same_model(tiny, tmp_path, monkeypatch):
    a = load_file(wb.workbench_path("tiny")/"model.safetensors")
    monkeypatch.setenv("SLMOPS_CACHE", str(tmp_path/"other"))
    b = load_file(wb.workbench_path("tiny")/"model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_spec_change_rebuilds(tiny, monkeypatch):
    p1 = wb.workbench_path("tiny")
    monkeypatch.setitem(wb.MODEL_SPECS, "tiny", {**TINY, "seed": 4})
    assert wb.workbench_path("tiny") != p1


def test_tokenizer_chat_template_and_single_token_labels(tiny):
    tok = wb.load_tokenizer("workbench:tokenizer")
    assert all(len(tok.tokenize("\n" + t)) == 2 for t in TONES)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    enc = encode_chats(tok, [("Hi there", "joy")])[0]
    learned = [i for i, l in zip(enc["input_ids"], enc["labels"]) if l != -100]
    assert tok.decode(learned) == "joy<|end|>\n"


def test_load_model_errors(tmp_path):
    with pytest.raises(SlmopsError, match="model folder not found"):
        wb.load_model(str(tmp_path/"nope"))
    (tmp_path/"empty").mkdir()
    with pytest.raises(SlmopsError, match=r"not a model folder \(no config.json\)"):
        wb.load_model(tmp_path/"empty")
    (tmp_path/"noweights").mkdir(); (tmp_path/"noweights"/"config.json").write_text("{}")
    with pytest.raises(SlmopsError, match="config.json but no weights"):
        wb.load_model(tmp_path/"noweights")
    with pytest.raises(SlmopsError, match="Unknown workbench model 'giant'"):
        wb.load_model("workbench:giant")


def test_local_folder_works_like_a_name(tiny, tmp_path):
    src = wb.workbench_path("tiny")
    copy = shutil.copytree(src, tmp_path/"my-model")
    m, tok = wb.load_model(copy), wb.load_tokenizer(copy)
    out = generate(m, tok, ["Hello"], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)


def test_real_teacher_reaches_its_goal():
    "The workbench teacher (built once per cache) labels at least 90% of the tone test split."
    teacher, tok = wb.load_model("workbench:teacher"), wb.load_tokenizer("workbench:teacher")
    base = wb.load_model("workbench:base")
    test = tone_split("test")
    acc = accuracy(classify(teacher, tok, [r["phrase"] for r in test], TONES), [r["tone"] for r in test])
    assert acc >= 0.90, acc
    assert model_size(teacher)["params"] > model_size(base)["params"]


def test_workbench_command_writes_json(tmp_path):
    "slmops workbench (from the cache) reports timings and the teacher's accuracy as JSON."
    from slmops_nb.cli import main
    assert main(["workbench", "--json_file", str(tmp_path/"json")]) == 0
    res = json.loads((tmp_path/"json").read_text())
    assert res["fresh"] is False and res["teacher_test_accuracy"] >= 0.90
    assert set(res["artifact_build_seconds"]) == {"tokenizer", "base", "teacher"}


def test_base_learns_coarse_sentiment_not_the_six_tones():
    "The base model's chats answer positive / negative / neutral; the tones are chapter 3's job."
    texts = wb.base_texts()
    answers = {t.split("<|assistant|>\n")[1].split("<|end|>")[0] for t in texts if "<|assistant|>" in t}
    assert answers == {"positive", "negative", "neutral"}
    assert any(t.endswith("are words of joy.") for t in texts) and len(texts) > len(wb.pretraining_texts())
