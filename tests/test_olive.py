import re

import pytest

from slmops_nb.core import SlmopsError
from slmops_nb.data import tone_split, write_jsonl
from slmops_nb.adapt import FinetuneConfig
from slmops_nb.tools import ToolError, finetune_workflow, olive_finetune, olive_training_args, run_olive, run_olive_batch
from slmops_nb.models import resolve_model

TEMPLATE = "<|user|>\n{phrase}<|end|>\n<|assistant|>\n{tone}<|end|>\n"


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path/"tones.jsonl", tone_split("train")[:16])


@pytest.mark.parametrize("kw,message", [
    (dict(method="dora"), "Unknown Olive fine-tuning method 'dora': use one of ('lora', 'qlora')"),
    (dict(data_template="{phrase} -> {label}"), "label"),
])
def test_bad_olive_finetune_arguments_are_refused_before_olive_runs(tmp_path, data, kw, message):
    template = kw.pop("data_template", TEMPLATE)
    with pytest.raises(SlmopsError, match=re.escape(message)):
        olive_finetune("workbench:base", (data, template), tmp_path/"out", **kw)
    assert not (tmp_path/"out").exists() and not (tmp_path/"out.olive.log").exists()


def test_a_rank_0_is_refused_when_the_settings_are_made():
    with pytest.raises(SlmopsError, match=re.escape("LoRA rank must be an integer of at least 1, got 0")):
        FinetuneConfig(lora_r=0)


@pytest.mark.parametrize("kw,message", [
    (dict(method="dora"), "Unknown Olive fine-tuning method 'dora'"),
    (dict(data_template="{phrase} -> {label}"), "label"),
    (dict(device="tpu"), "Unknown device 'tpu' for an Olive workflow: use one of ['cpu', 'gpu']"),
])
def test_bad_workflow_arguments_are_refused(data, kw, message):
    template = kw.pop("data_template", TEMPLATE)
    with pytest.raises(SlmopsError, match=re.escape(message)):
        finetune_workflow("workbench:base", (data, template), **kw)


def test_workflow_follows_olive_finetune_per_method(data):
    "As `olive finetune` does: target modules only in a LoRA pass; a QLoRA pass saves no quantization config."
    config = FinetuneConfig(target_modules=["q_proj", "v_proj"], max_steps=3)
    lora, qlora = (finetune_workflow("workbench:base", (data, TEMPLATE), m, config)["passes"]["f"] for m in ("lora", "qlora"))
    assert lora["target_modules"] == ["q_proj", "v_proj"] and "save_quant_config" not in lora
    assert "target_modules" not in qlora and qlora["save_quant_config"] is False
    assert lora["training_args"] == qlora["training_args"] == olive_training_args(config)
    assert lora["training_args"]["max_steps"] == 3


def test_olive_exit_0_without_output_is_an_error_and_keeps_earlier_output(tmp_path, data):
    "A dry run exits 0 and writes no adapter: run_olive says so, names the log, and leaves the earlier output alone."
    out = tmp_path/"lora"; out.mkdir(); (out/"earlier.txt").write_text("earlier adapter")
    args = ["finetune", "-m", resolve_model("workbench:base"), "-d", "json", "--data_files", data, "--train_split", "train",
            "--text_template", TEMPLATE, "--dry_run"]
    with pytest.raises(ToolError, match=r"olive finetune exited 0 but did not write \['adapter/adapter_config.json'\]") as e:
        run_olive(args, out, ["adapter/adapter_config.json"])
    assert str(tmp_path/"lora.olive.log") in str(e.value) and "last lines of the log" in str(e.value)
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
    args[2] = tmp_path/"no-model"
    with pytest.raises(ToolError, match="(?s)olive finetune exited with code 1.*Repo id must be in the form"):
        run_olive(args, out, [])
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
    args[2] = resolve_model("workbench:base")  # in one process: a run without output fails the batch, and nothing is written
    with pytest.raises(ToolError, match=r"olive \(2 runs in one process\) exited 0 but did not write \['a/adapter/adapter_config.json'"):
        run_olive_batch({"a": args, "b": args}, out, ["adapter/adapter_config.json"])
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
    assert (tmp_path/"lora.olive.log").read_text().count("$ olive finetune") == 2  # the second ran after the first wrote nothing
