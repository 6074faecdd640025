import filecmp
import os
import subprocess
import sys
from pathlib import Path

from conftest import NETWORK_CUT

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_nbdev_test_passes(tmp_path):
    "Every library notebook runs top to bottom (its cells are the module's unit tests)."
    env = {**os.environ, "SLMOPS_RUNS_ROOT": str(tmp_path/"runs")}
    # Chapters (01_ ... 09_) are left out here: nbdev_test would run them in the default profile, and the
    # whole-workbook smoke run (test_cli) already executes every one of their cells under papermill. Offline, as they run.
    r = subprocess.run([*NETWORK_CUT, BIN/"nbdev_test", "--n_workers", "1", "--skip_file_re", "^([_.]|0[1-9]_)"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def test_library_is_in_sync_with_notebooks(project):
    "nbdev_export on a copy writes exactly the committed library."
    dst = project
    r = subprocess.run([BIN/"nbdev_export"], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cmp = filecmp.dircmp(ROOT/"slmops_nb", dst/"slmops_nb", ignore=["__pycache__", "data"])
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only, (cmp.diff_files, cmp.left_only, cmp.right_only)


def test_notebooks_are_clean(project):
    "nbdev_clean changes nothing: committed notebooks carry no execution noise."
    dst = project
    r = subprocess.run([BIN/"nbdev_clean"], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    changed = [p.name for p in (ROOT/"nbs").glob("*.ipynb") if not filecmp.cmp(p, dst/"nbs"/p.name, shallow=False)]
    assert not changed, changed


def test_readme_is_generated_from_index():
    "README.md is nbs/index.ipynb as Markdown (regenerate: jupyter nbconvert --to markdown --stdout nbs/index.ipynb > README.md)."
    r = subprocess.run([BIN/"jupyter", "nbconvert", "--to", "markdown", "--stdout", ROOT/"nbs"/"index.ipynb"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (ROOT/"README.md").read_text() == r.stdout


def test_committed_outputs_show_no_frozen_widgets():
    "Chapters run by slmops run save progress as plain lines: a widget in a saved notebook would show frozen at its first state."
    import json
    widgets = [f"{p.name} cell {c.get('id')}" for p in sorted((ROOT/"nbs").glob("0[1-9]_*.ipynb"))
               for c in json.loads(p.read_text())["cells"] for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not widgets, widgets
