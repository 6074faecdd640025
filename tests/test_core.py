import subprocess
import sys
import json
import multiprocessing as mp
import time

import numpy as np
import pytest
import torch

from slmops_nb.measure import PeakMemory, latency_stats, model_size
from slmops_nb.chapter import chapter_folder
from slmops_nb.core import (SlmopsError, atomic_dir, atomic_write_text, by_profile, cached_artifact, content_hash, env_report,
    new_run_dir, seed_everything, write_metrics)


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path):
    f = atomic_write_text(tmp_path/"m.json", "old")
    with pytest.raises(TypeError):
        atomic_write_text(f, object())  # not text: the write fails
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    with atomic_dir(tmp_path/"a") as t: (t/"v").write_text("1")
    with atomic_dir(tmp_path/"a") as t: (t/"v").write_text("2")
    assert (tmp_path/"a"/"v").read_text() == "2"
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path/"a") as t:
            (t/"v").write_text("3"); raise ValueError
    assert (tmp_path/"a"/"v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["a"]


def _build_slowly(root, out):
    def build(tmp):
        (tmp/"pid").write_text("built")
        with open(out, "a") as f: f.write("x")
        time.sleep(0.5)
    cached_artifact("race", {"k": 1}, build, root=root)


def test_cache_builds_once_across_processes(tmp_path):
    counter = tmp_path/"count"
    ps = [mp.get_context("spawn").Process(target=_build_slowly, args=(tmp_path/"c", counter)) for _ in range(2)]
    for p in ps: p.start()
    for p in ps: p.join(60)
    assert all(p.exitcode == 0 for p in ps)
    assert counter.read_text() == "x"  # the second process waited and reused the first one's build


def test_cache_key_is_content_not_order():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1}) != content_hash({"a": 2, "b": [1, 2]})


def test_interrupted_build_leaves_nothing_and_rebuilds(tmp_path):
    def broken(tmp):
        (tmp/"half").write_text("x"); raise RuntimeError("power cut")
    with pytest.raises(RuntimeError):
        cached_artifact("m", {"v": 1}, broken, root=tmp_path)
    assert [p for p in (tmp_path/"m").iterdir() if not p.name.endswith(".lock")] == []
    p = cached_artifact("m", {"v": 1}, lambda t: (t/"w").write_text("ok"), root=tmp_path)
    assert (p/"w").read_text() == "ok"


def test_run_dirs_and_latest(tmp_path):
    r1, r2 = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert r1 != r2 and (tmp_path/"latest").resolve() == r2.resolve()
    d = chapter_folder({"__session__": "nbs/01_introduction.ipynb"})  # no out_dir: a new run under $SLMOPS_RUNS_ROOT
    assert d.name == "01_introduction" and (d.parent.parent/"latest").resolve() == d.parent.resolve()


def test_metrics_merge_and_corrupt_file_is_not_overwritten(tmp_path):
    write_metrics(tmp_path, {"a": np.float64(0.5)})
    assert write_metrics(tmp_path, {"b": torch.tensor(3)}) == {"a": 0.5, "b": 3}
    (tmp_path/"metrics.json").write_text("{broken")
    with pytest.raises(SlmopsError, match="metrics.json: not valid JSON"):
        write_metrics(tmp_path, {"c": 1})
    assert (tmp_path/"metrics.json").read_text() == "{broken"


def test_profiles():
    assert by_profile("default", 0, default=100, smoke=10) == 100
    with pytest.raises(SlmopsError, match="Unknown profile 'quick'"):
        by_profile("quick", 0, default=1, smoke=1)


def test_measurements():
    s = latency_stats(lambda: time.sleep(0.003), repeats=8, warmup=1)
    assert s["n"] == 8 and 2.5 < s["p50_ms"] <= s["p95_ms"] <= s["max_ms"]
    with pytest.raises(SlmopsError):
        latency_stats(lambda: None, repeats=0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sz = model_size(m)
    assert sz["params"] == 4 * 3 + 3 + 3 + 3 and sz["buffer_bytes"] > 0
    with PeakMemory() as small: pass
    with PeakMemory() as big:
        a = np.ones(300 * 2**20 // 8); time.sleep(0.05); del a
    assert big.delta_mb > 250 > small.delta_mb


def test_seed_and_env():
    seed_everything(7); a = torch.randn(4)
    seed_everything(7); assert torch.equal(a, torch.randn(4))
    env = env_report()
    assert env["cores_logical"] >= 1 and env["packages"]["transformers"] and isinstance(env["gpus"], list)
    json.dumps(env)


def test_the_toolkit_needs_only_the_core_requirements():
    "Importing the package and its toolkit modules loads no package of an extra (olive, deploy, llama, serve, workbook)."
    # (not bitsandbytes: PEFT imports it whenever it is installed, and works without it)
    extras = ["olive", "onnxruntime", "onnxruntime_genai", "foundry_local_sdk", "llama_cpp", "fastapi", "uvicorn", "openai", "papermill",
              "nbdev", "jupyterlab", "matplotlib", "optuna", "tensorboard"]
    code = ("import sys, slmops_nb, slmops_nb.core, slmops_nb.measure, slmops_nb.data, slmops_nb.datagen, slmops_nb.models, "
            "slmops_nb.train, slmops_nb.adapt, slmops_nb.evaluate, slmops_nb.runtimes, slmops_nb.tools, slmops_nb.artifacts\n"
            f"print(sorted(m for m in {extras!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
