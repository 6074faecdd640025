"""Ctrl-C and SIGTERM stop a real `slmops run` cleanly; a killed build's temporary folder is cleaned by the next build."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from slmops_nb.core import cached_artifact

SLMOPS = str(Path(sys.executable).parent/"slmops")
SLOW_CELL = """import os, time, pathlib
from slmops_nb.core import cached_artifact
pathlib.Path(out_dir, "kernel.pid").write_text(str(os.getpid()))
cached_artifact("slow", {"x": 1}, lambda tmp: time.sleep(300))"""


def _chapters(tmp_path) -> Path:
    nbs = tmp_path/"nbs"; nbs.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell('profile: str = "default"\nout_dir: str = ""')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(SLOW_CELL)]
    nbformat.write(nb, nbs/"01_slow.ipynb")
    return nbs


def _start(tmp_path):
    cache, out = tmp_path/"cache", tmp_path/"run"
    env = {**os.environ, "SLMOPS_CACHE": str(cache)}
    proc = subprocess.Popen([SLMOPS, "run", "--nbs", _chapters(tmp_path), "--out", out, "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((cache/"slow").glob(".*.tmp-*")):  # the cell is building into a temporary folder
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, cache, out, int((out/"01_slow"/"kernel.pid").read_text())


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE: return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_run_with_one_line(tmp_path, sig, code):
    proc, cache, out, kernel = _start(tmp_path)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == code, stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    notebook = out.resolve()/"01_slow"/"01_slow.ipynb"
    assert lines == [f"slmops: interrupted ({sig.name}) in chapter 01_slow; its partial notebook: {notebook}. "
                     "Finished chapters and cached models are kept."], stderr
    assert "Traceback" not in stdout + stderr
    assert notebook.exists() and _gone(kernel)
    assert not list((cache/"slow").glob(".*.tmp-*"))  # the cell's finally removed its temporary folder
    summary = json.loads((out/"summary.json").read_text())
    assert [(c["chapter"], c["status"]) for c in summary["chapters"]] == [("01_slow", "interrupted")]


def test_a_killed_build_is_cleaned_by_the_next_one(tmp_path):
    proc, cache, out, kernel = _start(tmp_path)
    proc.kill()  # SIGKILL: no handler runs; the kernel sees its parent gone and exits without cleaning up
    proc.communicate(timeout=30)
    assert _gone(kernel, 30)
    stale = list((cache/"slow").glob(".*.tmp-*"))
    assert stale  # what the killed build left
    path = cached_artifact("slow", {"x": 1}, lambda tmp: (tmp/"w.txt").write_text("built"), root=cache)
    assert (path/"w.txt").read_text() == "built" and not any(p.exists() for p in stale)
