import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slmops_nb.core import SlmopsError
from slmops_nb.data import DataError, Task, tone_split, write_jsonl
from slmops_nb.train import WeightedLossTrainer, class_weights, overfitting_points, task_examples, weighted_examples
from slmops_nb.adapt import FinetuneConfig, check_lora, finetune, prepare_model, trainable_parameters
from slmops_nb.finetuning import check_methods
from slmops_nb.train import PadCollator, encode_chats, training_defaults
from slmops_nb.models import load_tokenizer

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("workbench:base")


def test_unknown_method_is_refused():
    with pytest.raises(SlmopsError, match=re.escape("Unknown fine-tuning method(s) ['sgd']: use some of full, lora")):
        check_methods(["lora", "sgd"])


@pytest.mark.parametrize("kw,message", [
    (dict(r=0, alpha=16), "LoRA rank must be an integer of at least 1, got 0"),
    (dict(r=8, alpha=0), "LoRA alpha must be positive"),
    (dict(r=8, alpha=16, dropout=1.0), "LoRA dropout must be in [0, 1)"),
])
def test_bad_lora_settings_are_refused(kw, message):
    with pytest.raises(SlmopsError, match=re.escape(message)):
        check_lora(**kw)


def test_rank_0_is_refused_before_training(tmp_path, tok):
    ex = encode_chats(tok, [(r["phrase"], r["tone"]) for r in tone_split("train")[:8]])
    with pytest.raises(SlmopsError, match="LoRA rank must be an integer of at least 1, got 0"):
        finetune("lora", "workbench:base", tok, ex, ex, tmp_path/"out", FinetuneConfig(lora_r=0))
    assert not (tmp_path/"out"/"model").exists()


def test_missing_data_column_is_named(tmp_path):
    f = write_jsonl(tmp_path/"train.jsonl", [{"phrase": "I am glad", "label": "joy"}])
    with pytest.raises(DataError, match="tone"):
        Task(train_file=str(f)).splits()


def test_cli_refuses_unknown_method(tmp_path):
    r = subprocess.run([BIN/"slmops", "finetune", "--method", "sgd", "--out", tmp_path/"x"], capture_output=True, text=True)
    assert r.returncode == 2 and "Unknown method 'sgd'" in r.stderr, r.stderr
    assert not (tmp_path/"x").exists()


def test_qlora_base_is_really_4bit_and_lora_trains_few_parameters():
    lora, qlora = prepare_model("lora", "workbench:base"), prepare_model("qlora", "workbench:base")
    assert "Params4bit" in type(qlora.base_model.model.model.layers[0].mlp.up_proj.weight).__name__
    (t, n), (tq, nq) = trainable_parameters(lora), trainable_parameters(qlora)
    assert t == tq and n == nq and 0 < t / n <= 0.05


def test_overfitting_points():
    hist = [{"loss": 1.0, "step": 1}, {"eval_loss": 1.0, "step": 1}, {"loss": 0.8, "step": 2}, {"eval_loss": 0.9, "step": 2},
            {"loss": 0.5, "step": 3}, {"eval_loss": 0.95, "step": 3}, {"loss": 0.6, "step": 4}, {"eval_loss": 1.2, "step": 4}]
    assert [p["step"] for p in overfitting_points(hist)] == [3]  # at step 4 the training loss rose too


def test_class_weights():
    assert class_weights(["a", "a", "a", "b"]) == {"a": 4 / 6, "b": 2.0}


@pytest.mark.parametrize("labels", [["book_flight", "book_hotel"], ["sadness", "surprise"]])
def test_weighted_loss_takes_labels_that_start_alike(tok, qwen_dir, labels):
    "Class weights ride with the examples: labels sharing their first tokens (book_*; the tones on a ChatML tokenizer) work."
    from transformers import TrainingArguments
    for folder in ("workbench:base", qwen_dir):
        t, model = load_tokenizer(folder), prepare_model("full", folder)
        records = [{"text": f"example {i}", "label": labels[i % 2]} for i in range(8)]
        ex = task_examples(t, Task("x.jsonl", input_column="text", label_column="label"), records)
        args = TrainingArguments(output_dir="/tmp/slmops-test-wl", **training_defaults())
        plain = model(**PadCollator(t.pad_token_id)(ex)).loss.item()
        trainer = WeightedLossTrainer(model=model, args=args)
        unit = trainer.compute_loss(model, PadCollator(t.pad_token_id)(weighted_examples(ex, records, "label", dict.fromkeys(labels, 1.0))))
        weighted = trainer.compute_loss(model, PadCollator(t.pad_token_id)(weighted_examples(ex, records, "label", {labels[0]: 5.0, labels[1]: 0.2})))
        assert math.isclose(unit.item(), plain, rel_tol=1e-5) and abs(weighted.item() - plain) > 1e-4, folder


def test_weighted_loss_equals_plain_loss_without_weights_and_smoothing_changes_it(tok):
    from transformers import TrainingArguments
    model = prepare_model("full", "workbench:base")
    batch = PadCollator(tok.pad_token_id)(encode_chats(tok, [(r["phrase"], r["tone"]) for r in tone_split("train")[:8]]))
    args = TrainingArguments(output_dir="/tmp/slmops-test-wl", **training_defaults())
    plain = model(**batch).loss.item()
    assert math.isclose(WeightedLossTrainer(model=model, args=args).compute_loss(model, dict(batch)).item(), plain, rel_tol=1e-5)
    smoothed = WeightedLossTrainer(model=model, args=args, label_smoothing=0.1)
    assert abs(smoothed.compute_loss(model, dict(batch)).item() - plain) > 1e-3


def test_slmops_finetune_without_validation_carves_it_from_the_train_file(intents_csv, tmp_path):
    r = subprocess.run([BIN/"slmops", "finetune", "--method", "lora", "--train_file", intents_csv, "--input-column", "utterance",
                        "--label-column", "intent", "--out", tmp_path/"ft", "--max-steps", "2", "--batch-size", "8"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path/"ft"/"ranks"/"rank-0.json").read_text())["train_examples"] == 88  # 22 of the 30 of each label: not the tones
    r = subprocess.run([BIN/"slmops", "finetune", "--train_file", intents_csv, "--out", tmp_path/"x"], capture_output=True, text=True)
    assert r.returncode == 2 and "missing column(s) ['phrase', 'tone']" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_torchrun_two_processes_one_ddp_run(tmp_path):
    "torchrun --nproc_per_node 2: both ranks train (gloo), each on half of every batch, and one adapter is saved."
    out = tmp_path/"ddp"
    r = subprocess.run([BIN/"torchrun", "--nproc_per_node", "2", "--no-python", BIN/"slmops", "finetune", "--method", "lora",
                        "--out", out, "--epochs", "1", "--limit", "64", "--batch-size", "8", "--max-length", "48"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ranks = [json.loads((out/"ranks"/f"rank-{i}.json").read_text()) for i in range(2)]
    assert [x["rank"] for x in ranks] == [0, 1]
    assert all(x["world_size"] == 2 and x["backend"] == "gloo" for x in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] == math.ceil(64 / (8 * 2))  # the 64 examples were split over the two
    assert (out/"model"/"adapter_model.safetensors").exists() and (out/"model"/"adapter_config.json").exists()
    assert json.loads((out/"result.json").read_text())["steps"] == ranks[0]["steps"]
