import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from mlflow import MlflowClient
from openai import OpenAI

from conftest import NETWORK_CUT, slmops
from slmops_nb.core import artifact_info, read_json
from slmops_nb.data import Task
from slmops_nb.models import TASK_TEACHER, resolve_model, task_model
from slmops_nb.registry import model_folder
from slmops_nb.runtimes import GenAIModel
from slmops_nb.serve import ServerProcess
from slmops_nb.runner import list_chapters, notebooks_dir

ROOT = Path(__file__).resolve().parent.parent


REACH = """
import socket
server = socket.create_server(("127.0.0.1", 0))
socket.create_connection(server.getsockname(), timeout=5).close()  # loopback works: chapter 05 serves its models there
try: socket.create_connection(("pypi.org", 443), timeout=5); print("reached pypi.org")
except OSError as e: print("no network:", type(e).__name__)
"""


def test_the_tests_runs_have_loopback_only():
    "As root (CI), every `slmops` run of these tests is in a network namespace of its own: a registry or hub call fails its test."
    assert NETWORK_CUT or os.geteuid() != 0, "as root the runs must be cut off: unshare -n and ip (iproute2) are needed"
    r = subprocess.run([*NETWORK_CUT, sys.executable, "-c", REACH], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("no network:") if NETWORK_CUT else r.stdout, r.stdout


def test_list_shows_chapters_and_parameters():
    r = slmops("list")
    assert r.returncode == 0, r.stderr
    assert "01_introduction:" in r.stdout and "eval_limit: int = 0" in r.stdout and "profile: str" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["01", "-p", "no_such=1"], "Unknown parameter(s) ['no_such']. The chapters take:"),
    (["01", "-p", "eval_limit=many"], "parameter eval_limit must be int (default 0), got 'many'"),
    (["01", "-p", "eval_limit=True"], "parameter eval_limit must be int"),
    (["01", "-p", "out_dir=/tmp/x"], "are set by the runner"),
    (["99"], "Unknown chapter '99'; chapters: 01_introduction"),
    (["01", "-p", "eval_limit"], "is not NAME=VALUE"),
    (["03", "-p", "epochs=-1"], "parameter epochs must be at least 0 (default 0"),
    (["03", "-p", "lr=-0.1"], "parameter lr must be at least 0"),
])
def test_bad_parameters_are_refused_before_anything_runs(tmp_path, args, message):
    out = tmp_path/"run"; out.mkdir(); (out/"keep.txt").write_text("earlier results")
    r = slmops("run", *args, "--out", out)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out/"keep.txt").read_text() == "earlier results"


def test_unknown_parameter_lists_the_parameters(tmp_path):
    r = slmops("run", "01", "-p", "teacher=x", "--out", tmp_path)
    assert "01_introduction:" in r.stderr and "teacher_model: str" in r.stderr and "seed: int = 0" in r.stderr


def test_bad_profile_is_refused():
    r = slmops("run", "--profile", "fast")
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr


def _notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell('profile: str = "default"\nout_dir: str = ""')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


def test_failing_chapter_stops_the_run_and_names_cell_and_notebook(tmp_path):
    nbs = tmp_path/"nbs"; nbs.mkdir()
    _notebook(nbs/"01_ok.ipynb", "import json, pathlib\npathlib.Path(out_dir, 'metrics.json').write_text(json.dumps({'x': 1}))")
    _notebook(nbs/"02_fail.ipynb", "raise ValueError('the data has no tone column')")
    _notebook(nbs/"03_never.ipynb", "open('/tmp/should-not-run', 'w')")
    out = tmp_path/"run"
    r = slmops("run", "--nbs", nbs, "--out", out, "--profile", "smoke", "--no-progress")
    assert r.returncode == 2
    assert "Chapter 02_fail failed in cell [3]" in r.stderr and "ValueError: the data has no tone column" in r.stderr
    assert f"open the executed notebook: {out.resolve()/'02_fail'/'02_fail.ipynb'}" in r.stderr
    assert (out/"02_fail"/"02_fail.ipynb").exists() and not (out/"03_never").exists()
    summary = json.loads((out/"summary.json").read_text())
    assert [(c["chapter"], c["status"]) for c in summary["chapters"]] == [("01_ok", "ok"), ("02_fail", "failed")]
    assert json.loads((out/"01_ok"/"metrics.json").read_text()) == {"x": 1}
    assert "02_fail" in (out/"report.md").read_text()


def test_whole_workbook_smoke_run(tmp_path, monkeypatch):
    "slmops run --profile smoke: every chapter under papermill, offline, into a temporary folder."
    out = tmp_path/"smoke"
    r = slmops("run", "--profile", "smoke", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    chapters = [p.stem for p in list_chapters(notebooks_dir())]
    summary = json.loads((out/"summary.json").read_text())
    assert [c["chapter"] for c in summary["chapters"]] == chapters
    assert all(c["status"] == "ok" for c in summary["chapters"])
    for ch in chapters:
        metrics = json.loads((out/ch/"metrics.json").read_text())
        assert metrics and metrics["profile"] == "smoke", ch
        assert (out/ch/f"{ch}.ipynb").exists() and list((out/ch).glob("*.png")), ch
    intro = json.loads((out/"01_introduction"/"metrics.json").read_text())
    for key in ("teacher_params", "teacher_test_accuracy", "base_params", "teacher_latency_ms_p50"):
        assert key in intro
    assert intro["teacher_test_accuracy"] >= 0.90 and intro["teacher_params"] > intro["base_params"]
    distill = json.loads((out/"02_distillation"/"metrics.json").read_text())
    for key in ("teacher_accuracy", "student_gold_only_accuracy", "student_seq_kd_accuracy", "student_logit_kd_accuracy",
                "retention", "param_ratio", "latency_ratio", "memory_ratio", "synthetic_examples_kept", "synthetic_examples_total"):
        assert key in distill, key
    assert 0 < distill["synthetic_examples_kept"] <= distill["synthetic_examples_total"] and distill["param_ratio"] < 0.1
    assert (out/"02_distillation"/"synthetic.jsonl").exists() and (out/"02_distillation"/"student"/"config.json").exists()
    ft = json.loads((out/"03_finetuning"/"metrics.json").read_text())
    assert set(ft["methods"]) == {"full", "lora", "qlora", "ia3", "olive_lora", "olive_qlora", "lora_as_olive", "qlora_as_olive"}
    for name, m in ft["methods"].items():
        assert set(m) == {"trainable_params", "trainable_fraction", "peak_memory_mb", "train_seconds", "eval_loss", "accuracy",
                          "f1", "perplexity"}, name
        assert 0 <= m["accuracy"] <= 1 and m["perplexity"] >= 1 and m["train_seconds"] > 0, name
    assert ft["methods"]["full"]["trainable_fraction"] == 1 and ft["methods"]["lora"]["trainable_fraction"] <= 0.05
    assert len(ft["hpo"]["trials"]) == 2 and {"lr", "r", "batch_size"} <= set(ft["hpo"]["best"])
    assert {"bleu", "rougeL", "chrf"} <= set(ft["generation"]) and ft["multi_adapter"]["adapters"] == ["task", "qa"]
    assert set(ft["custom_loss"]) == {"plain", "custom"} and "lora_accuracy_ratio" in ft
    assert (out/"03_finetuning"/"qa"/"model"/"adapter_config.json").exists() and (out/"03_finetuning"/"merged"/"config.json").exists()
    assert (out/"03_finetuning"/"olive_cli"/"config.json").exists() and (out/"03_finetuning"/"olive_lora"/"olive"/"adapter").is_dir()
    for m, p in ft["olive_parity"].items():  # Olive's gap to PEFT's LoRA = its recipe (the control) + the rest
        assert abs(p["vs_lora_points"] - p["recipe_points"] - p["residual_points"]) < 1e-9, m
    assert list((out/"03_finetuning"/"lora"/"checkpoints"/"runs").rglob("events.out.tfevents.*"))  # TensorBoard
    dep = json.loads((out/"04_deployment"/"metrics.json").read_text())
    assert set(dep["variants"]) == {"pytorch_fp32", "ort_fp32", "ort_int8", "ort_int4", "foundry_local"}
    frontier = {v["name"]: v for v in dep["frontier"]}  # the smoke profile's: one block size
    assert {"ort_fp32", "ort_int8", "ort_int4", "ort_int4_rtn_b32_sym", "ort_int4_mixed", "ort_int4_gptq"} <= set(frontier)
    for name, v in frontier.items():
        assert v["size_bytes"] > 0 and v["tokens_per_second"] > 0 and v["peak_memory_mb"] > 0 and 0 <= v["quality"] <= 1, name
    assert frontier["ort_int4_rtn_b32_sym"]["size_bytes"] < 0.3 * frontier["ort_fp32"]["size_bytes"]
    assert dep["vs_llama_cpp"]["decode_ratio"] > 0 and dep["vs_llama_cpp"]["ttft_ratio"] > 0  # ONNX Runtime GenAI over llama.cpp
    quality = dep["vs_llama_cpp"]["quality"]  # the three conversions, the recommended variant, the fastest at fp32's quality, two GGUF types
    assert {"ort_fp32", "ort_int8", "ort_int4", dep["recommended"]["name"], "llama_cpp_q4_0", "llama_cpp_q4_k_m"} <= set(quality) and len(quality) <= 7
    rows = {r["name"]: r for r in dep["vs_llama_cpp"]["rows"]}  # each against fp32, and against the machine's bandwidth
    assert rows["ort_fp32"]["agreement"] == 1 and rows["ort_fp32"]["kl"] < 1e-6 and rows["ort_fp32"]["mcnemar_p"] == 1
    assert all(0 <= r["agreement"] <= 1 and r["kl"] >= 0 and r["bandwidth_share"] > 0 and r["tokens_per_second_1t"] > 0 for r in rows.values())
    assert dep["vs_llama_cpp"]["bandwidth_gbps"]["1"] > 0
    par = dep["vs_llama_cpp"]["at_equal_quality"]
    assert quality[par["genai"]] >= quality["llama_cpp_q4_k_m"] and par["decode_ratio"] > 0 if "genai" in par else par["skipped"]
    best = frontier[dep["recommended"]["name"]]  # the fastest within the tolerance of fp32
    assert (frontier["ort_fp32"]["quality"] - best["quality"]) * 100 <= dep["recommended"]["tolerance_points"]
    assert not best["broken"] and not frontier["ort_fp32"]["broken"]  # the reference of the screen is never broken
    assert all(v["tokens_per_second"] <= best["tokens_per_second"] for v in frontier.values()
               if not v["broken"] and (frontier["ort_fp32"]["quality"] - v["quality"]) * 100 <= dep["recommended"]["tolerance_points"])
    for name, v in dep["variants"].items():
        assert set(v) == {"size_bytes", "load_seconds", "ttft_ms", "tokens_per_second", "latency_ms_p50", "latency_ms_p95",
                          "peak_memory_mb", "accuracy", "f1"}, name
        assert v["tokens_per_second"] > 0 and 0 <= v["accuracy"] <= 1, name
    assert dep["foundry_local"]["loaded"] and dep["server"]["errors"] == 0 and dep["server"]["wrong_answers"] == 0
    assert dep["server"]["requests"] == 24 and dep["int4_size_ratio"] < 0.3 and "int4_speedup_vs_pytorch" in dep
    assert dep["structured_output"]["invalid_rate_with"] == 0 and dep["structured_output"]["json_invalid_rate"] == 0
    assert (out/"04_deployment"/"bench.json").exists() and (out/"04_deployment"/"ort_int4"/"genai_config.json").exists()
    ops = json.loads((out/"05_operations"/"metrics.json").read_text())
    assert {"shift_window", "detected_window", "false_alarms"} <= set(ops["drift"]) and len(ops["week_scores"]) == ops["drift"]["windows"]
    assert {"recovery_points", "original_drop_points"} <= set(ops["challenger"]) and ops["canary"]["requests"] == 120
    assert ops["server"]["errors"] == 0 and ops["rollback"]["exercised"] and ops["registry"]["versions"] >= 4
    fl = ops["foundry_local"]  # the champion loaded in Foundry Local by its alias, under the registry's name and version
    assert fl["loaded"] and fl["model_id"] == f"tones-ort-int4:{ops['registry']['champion']}" and fl["agreement_with_genai"] == 1.0
    assert (out/"05_operations"/"monitor"/"monitor.md").exists() and (out/"05_operations"/"requests.jsonl").exists()
    report = (out/"report.md").read_text()
    assert all(f"## {ch}" in report for ch in chapters) and "teacher_test_accuracy" in report
    assert "headline metrics" in r.stdout and "summary:" in r.stdout
    _registry_holds_the_run(out, summary, dep, monkeypatch)


def _registry_holds_the_run(out, summary, dep, monkeypatch):
    "MLflow, read with its own client: a run per chapter with its metrics, the run's models as versions with lineage, aliases."
    client = MlflowClient(tracking_uri=f"sqlite:///{out/'mlflow.db'}", registry_uri=f"sqlite:///{out/'mlflow.db'}")
    runs = {c["chapter"]: client.get_run(c["tracking"]["mlflow_run"]) for c in summary["chapters"]}
    assert runs["04_deployment"].data.metrics["int4_size_ratio"] == dep["int4_size_ratio"]
    assert runs["03_finetuning"].data.params["profile"] == "smoke"
    versions = {v.name: v for v in client.search_model_versions()}
    assert {"tones-student", "tones-merged-model", "tones-task-adapter", "tones-qa-adapter", "tones-ort-int4"} <= set(versions)
    int4 = client.get_model_version("tones-ort-int4", "1")
    assert int4.tags["slmops.parent"] == "tones-merged-model/1" and int4.tags["slmops.precision"] == "int4"
    merged = client.get_model_version("tones-merged-model", "1")
    assert merged.tags["slmops.method"] == "lora" and merged.tags["slmops.data_hash"]
    assert "champion" in client.get_registered_model("tones-ort-int4").aliases  # chapter 04's, or chapter 05's promoted challenger
    challenger = client.get_model_version("tones-ort-int4", "2")  # chapter 05's, from its labelled window
    assert challenger.tags["slmops.chapter"] == "05_operations" and challenger.tags["slmops.parent"] == "tones-merged-model/2"
    served = model_folder("models:/tones-ort-int4@champion", out)
    assert (served/"genai_config.json").exists() and served != out/"04_deployment"/"ort_int4"  # the registered copy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out/'mlflow.db'}")
    with ServerProcess("models:/tones-ort-int4@champion", log=out/"serve-champion.log") as server:  # slmops serve models:/...
        client = OpenAI(base_url=server.base_url, api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tones-ort-int4-champion"]
        wow = [{"role": "user", "content": "Wow!"}]
        r = client.chat.completions.create(model="tones-ort-int4-champion", max_tokens=8, messages=wow)
        assert r.choices[0].message.content == GenAIModel(served).chat(wow, 8)  # the registered champion answers (a smoke one may say nothing)


def test_bad_data_column_is_refused_before_any_model_loads(tmp_path, intents_csv):
    "A data parameter naming a column the file lacks stops the run in seconds: no chapter starts, nothing is written."
    out = tmp_path/"run"
    t0 = time.perf_counter()
    r = slmops("run", "-p", f"train_file={intents_csv}", "-p", "input_column=utterance", "-p", "label_column=label", "--out", out)
    seconds = time.perf_counter() - t0
    assert r.returncode == 2 and f"{intents_csv}: missing column(s) ['label']; columns found: ['id', 'intent', 'utterance']" in r.stderr
    assert not out.exists() and seconds < 30, seconds


def test_relative_paths_start_where_slmops_was_started(tmp_path, intents_csv):
    "Chapters run from nbs/; a relative path in a parameter still means the caller's folder."
    (tmp_path/"data").mkdir(); shutil.copy(intents_csv, tmp_path/"data"/"intents.csv")
    r = slmops("run", "03", "-p", "train_file=data/intents.csv", "-p", "input_column=utterance", "-p", "label_column=nope",
               "--nbs", ROOT/"nbs", cwd=tmp_path)
    assert r.returncode == 2 and f"{tmp_path/'data'/'intents.csv'}: missing column(s) ['nope']" in r.stderr, r.stderr
    r = slmops("run", "01", "--profile", "smoke", "-p", "base_model=./no-such-model", "--out", tmp_path/"run", "--no-progress",
               "--nbs", ROOT/"nbs", cwd=tmp_path)
    assert r.returncode == 2 and f"{tmp_path/'no-such-model'}: model folder not found" in r.stderr, r.stderr[-2000:]


def test_chapter01_takes_one_model_as_base_and_teacher(tmp_path, qwen_dir):
    "The same folder in both roles is measured, with a warning that says what distillation needs (no bare assert)."
    out = tmp_path/"run"
    r = slmops("run", "01", "--profile", "smoke", "-p", f"base_model={qwen_dir}", "-p", f"teacher_model={qwen_dir}",
               "-p", "eval_limit=16", "-p", "latency_repeats=2", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out/"01_introduction"/"metrics.json").read_text())
    assert metrics["teacher_params"] == metrics["base_params"] and metrics["teacher_model"] == str(qwen_dir)
    assert "is not larger than the base" in (out/"01_introduction"/"01_introduction.ipynb").read_text()


def test_chapter02_distills_into_a_student_of_another_vocabulary_by_methods(tmp_path, qwen_dir):
    "A ChatML student cannot take logit KD from the workbench teacher: methods leaves it out, and the chapter runs."
    out = tmp_path/"run"
    r = slmops("run", "02", "--profile", "smoke", "-p", f"student={qwen_dir}", "-p", "kd_methods=['gold_only', 'seq_kd']",
               "-p", "unlabeled_size=128", "-p", "eval_limit=32", "-p", "latency_repeats=2", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out/"02_distillation"/"metrics.json").read_text())
    assert {"student_gold_only_accuracy", "student_seq_kd_accuracy"} <= set(metrics) and "student_logit_kd_accuracy" not in metrics
    assert metrics["best_student"] in ("gold_only", "seq_kd") and (out/"02_distillation"/"student"/"config.json").exists()
    r = slmops("run", "02", "-p", "kd_methods=['gold_only', 'kd']", "--out", tmp_path/"bad", "--no-progress", "--profile", "smoke")
    assert r.returncode == 2 and "kd_methods must be some of ['gold_only', 'seq_kd', 'logit_kd', 'seq_kd_scratch'], got ['gold_only', 'kd']" in r.stderr


def test_every_chapter_on_your_own_data(tmp_path, intents_files):
    "Intent CSVs of other columns (id, utterance, intent), by the data parameters: every chapter runs on them and says so."
    out = tmp_path/"run"
    r = slmops("run", "--profile", "smoke", *(a for s, f in intents_files.items() for a in ("-p", f"{s}_file={f}")),
               "-p", "input_column=utterance", "-p", "label_column=intent", "-p", "methods=['lora', 'olive_lora']",
               "-p", "frontier_variants=False", "-p", "llama_cpp=False",  # the smoke run measures both; here the conversions only
               "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    labels = ["book_flight", "book_hotel", "play_music", "set_alarm"]
    intro, distill, ft, dep = (json.loads((out/ch/"metrics.json").read_text()) for ch in
                               ("01_introduction", "02_distillation", "03_finetuning", "04_deployment"))
    assert ft["labels"] == labels and ft["task"]["test_file"] == str(intents_files["test"]) and ft["task"]["examples"]["test"] == 12
    assert intro["task"] == distill["task"] == ft["task"] == dep["task"] and ft["task"]["classes"] == labels
    assert distill["metric"] == "accuracy" and "student_seq_kd_accuracy" in distill and set(ft["methods"]) == {"lora", "olive_lora"}
    base = Path(ft["base_model"])  # workbench:base, continued on the task's inputs: its own cached build
    assert base.parent.name == "model-base" and base != resolve_model("workbench:base")
    assert artifact_info(base)["spec"]["data"]["task"]["label_column"] == "intent"
    assert intro["teacher_test_accuracy"] >= 0.9  # the workbench teacher was trained for this task
    teacher = task_model("workbench:teacher", Task(**{f"{s}_file": str(f) for s, f in intents_files.items()},
                                                   input_column="utterance", label_column="intent"))  # built by the run: cached
    evals = [h for h in read_json(teacher/"train_log.json")["log_history"] if "eval_loss" in h]
    best = min(range(len(evals)), key=lambda i: evals[i]["eval_loss"])  # it stopped `patience` epochs after its best one
    assert len(evals) - 1 - best == TASK_TEACHER["patience"] and evals[-1]["step"] < TASK_TEACHER["max_steps"]
    assert dep["task"] == ft["task"] and any("every label" in k for k in dep["checklist"])
    assert dep["conversion"]["fp32_logit_gap"] <= 1e-3
    assert [r["name"] for r in dep["frontier"]] == ["ort_fp32", "ort_int8", "ort_int4"] and "llama_cpp=False" in dep["vs_llama_cpp"]["skipped"]
    ops = json.loads((out/"05_operations"/"metrics.json").read_text())  # operations on your task: its labels checked live
    assert ops["task"] == ft["task"] and ops["server"]["errors"] == 0 and ops["rollback"]["exercised"]
