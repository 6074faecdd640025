import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_nbdev_test_passes(tmp_path):
    "Every library notebook runs top to bottom (its cells are the module's unit tests)."
    env = {**os.environ, "SLMOPS_RUNS_ROOT": str(tmp_path/"runs")}
    # Chapters (01_ ... 09_) are left out here: nbdev_test would run them in the default profile, and the
    # whole-workbook smoke run (test_cli) already executes every one of their cells under papermill.
    r = subprocess.run([BIN/"nbdev_test", "--n_workers", "1", "--skip_file_re", "^([_.]|0[1-9]_)"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def _copy_project(tmp_path):
    dst = tmp_path/"proj"
    dst.mkdir()
    for f in ("settings.ini", "setup.py", "README.md"): shutil.copy(ROOT/f, dst/f)
    shutil.copytree(ROOT/"nbs", dst/"nbs", symlinks=True)
    shutil.copytree(ROOT/"slmops_nb", dst/"slmops_nb", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_library_is_in_sync_with_notebooks(tmp_path):
    "nbdev_export on a copy writes exactly the committed library."
    dst = _copy_project(tmp_path)
    r = subprocess.run([BIN/"nbdev_export"], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cmp = filecmp.dircmp(ROOT/"slmops_nb", dst/"slmops_nb", ignore=["__pycache__", "data"])
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only, (cmp.diff_files, cmp.left_only, cmp.right_only)


def test_notebooks_are_clean(tmp_path):
    "nbdev_clean changes nothing: committed notebooks carry no execution noise."
    dst = _copy_project(tmp_path)
    r = subprocess.run([BIN/"nbdev_clean"], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    changed = [p.name for p in (ROOT/"nbs").glob("*.ipynb") if not filecmp.cmp(p, dst/"nbs"/p.name, shallow=False)]
    assert not changed, changed


def test_docs_preprocess(tmp_path):
    "nbdev_proc_nbs (the step before Quarto renders the site) succeeds and keeps the sidebar's pages."
    dst = _copy_project(tmp_path)
    shutil.copy(ROOT/"_quarto.yml", dst/"_quarto.yml")
    # nbdev_proc_nbs minus its Quarto check: without Quarto, nbdev_proc_nbs runs nbdev_install, which
    # would pip-install this copy over the environment's editable install. Quarto is not on these machines.
    code = ("import nbdev.doclinks; from nbdev.quarto import refresh_quarto_yml; from nbdev.serve import proc_nbs\n"
            "refresh_quarto_yml(); nbdev.doclinks._build_modidx(); proc_nbs()")
    r = subprocess.run([sys.executable, "-c", code], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    proc = dst/"_proc"
    import yaml
    cfg = yaml.safe_load((proc/"_quarto.yml").read_text())
    pages = [p for item in cfg["website"]["sidebar"]["contents"]
             for p in ([item] if isinstance(item, str) else item["contents"])]
    assert pages and all((proc/p).exists() for p in pages), pages


def test_readme_is_generated_from_index():
    "README.md is nbs/index.ipynb as Markdown (regenerate: jupyter nbconvert --to markdown --stdout nbs/index.ipynb > README.md)."
    r = subprocess.run([BIN/"jupyter", "nbconvert", "--to", "markdown", "--stdout", ROOT/"nbs"/"index.ipynb"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (ROOT/"README.md").read_text() == r.stdout
