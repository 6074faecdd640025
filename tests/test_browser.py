"""The workbook as a reader meets it, in a real browser (Playwright driving Debian's Chromium): chapter 01 run in JupyterLab
through its menus, and the docs pages (nbdev's pre-render, then nbconvert's HTML as a stand-in for Quarto) looked at."""
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CHROMIUM = Path(os.environ.get("SLMOPS_CHROMIUM", "/usr/bin/chromium"))
# As root, on a closed network: no sandbox, and none of Chromium's own connections (it would dial Google's hosts at start).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PARAMETER_LINE = 'profile: str = "default"  # default or smoke'
SMOKE_LINE = 'profile: str = "smoke"  # default or smoke'
PROGRESS_LINE = re.compile(r"\d+%\|")  # a tqdm bar drawn as text


@pytest.fixture(scope="module")
def browser():
    "Debian's Chromium under Playwright (Playwright's own browser download cannot work offline); `make test` installs it."
    assert CHROMIUM.exists(), (f"{CHROMIUM} not found: the browser tests drive Debian's Chromium. `make test` installs it "
                               "(apt-get install chromium); elsewhere set SLMOPS_CHROMIUM to a Chromium binary.")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _api(base: str, token: str, path: str):
    req = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r: return json.load(r)


@contextlib.contextmanager
def jupyterlab(root: Path, tmp: Path):
    "JupyterLab on a free loopback port with a token, serving `root`, its settings and state in `tmp`; yields (url, token)."
    news = tmp/"settings"/"@jupyterlab"/"apputils-extension"/"notification.jupyterlab-settings"
    news.parent.mkdir(parents=True, exist_ok=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no "Jupyter news?" toast over the page
    port, token, log = _free_port(), secrets.token_hex(16), tmp/"jupyterlab.log"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp/"config"), "JUPYTER_RUNTIME_DIR": str(tmp/"runtime")}
    env.pop("SLMOPS_PROGRESS", None)  # a reader's kernel: progress bars as widgets
    cmd = [BIN/"jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.workspaces_dir={tmp/'workspaces'}", f"--LabApp.user_settings_dir={tmp/'settings'}",
           "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else [])]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            assert proc.poll() is None, f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                _api(base, token, "/api/status"); break
            time.sleep(0.5)
        else: raise AssertionError(f"JupyterLab did not answer on {base} within 60 s:\n{log.read_text()[-3000:]}")
        yield base, token
    finally:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill()


def _kernels_idle(base: str, token: str) -> bool:
    try: kernels = _api(base, token, "/api/kernels")
    except urllib.error.HTTPError as e:  # a kernel still starting can fail the listing with a 500 (seen in CI36): not idle yet
        if e.code < 500: raise
        return False
    return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)


def _menu(page, menu: str, item: str):
    "Click `item` in the menu bar's `menu`, as a reader does."
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(menu)}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()


def run_in_jupyterlab(page, base: str, token: str, root: Path, rel: str, timeout: float = 900) -> dict:
    "Open `rel` in JupyterLab, set the smoke profile in its parameter cell by typing, Run All Cells, save; the saved notebook."
    page.goto(f"{base}/lab/tree/{rel}?token={token}&reset")
    page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=120_000)
    deadline = time.time() + 120
    while not _kernels_idle(base, token):
        assert time.time() < deadline, "the notebook's kernel did not start within 120 s"
        time.sleep(0.5)
    params = page.locator(".jp-CodeCell", has_text='profile: str = "default"')
    params.locator(".cm-content").click()
    page.keyboard.press("Control+Home"); page.keyboard.press("Shift+End")
    page.keyboard.type(SMOKE_LINE)
    page.keyboard.press("Escape")
    _menu(page, "Run", "Run All Cells")
    deadline, quiet_since = time.time() + timeout, None
    while True:  # done when no cell waits ([*]) and the kernel stays idle for two seconds
        busy = page.locator(".jp-InputPrompt", has_text="[*]").count() or not _kernels_idle(base, token)
        quiet_since = None if busy else (quiet_since or time.time())
        if quiet_since and time.time() - quiet_since > 2: break
        assert time.time() < deadline, f"{rel} still running after {timeout:.0f} s"
        time.sleep(1)
    saved = root/rel
    before = saved.stat().st_mtime_ns
    _menu(page, "File", "Save Notebook")
    deadline = time.time() + 30
    while saved.stat().st_mtime_ns == before:
        assert time.time() < deadline, "File > Save Notebook did not write the notebook within 30 s"
        time.sleep(0.2)
    time.sleep(0.5)  # the write is atomic (JupyterLab's save replaces the file), but let it finish
    return json.loads(saved.read_text())


def check_ran_clean(nb: dict):
    "Every code cell ran and none shows an error; a failure names the cell (its number, id and first line) and the error."
    cells = [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    def name(i, c): return f"cell {i} (id {c.get('id')}, `{''.join(c['source']).splitlines()[0] if c['source'] else ''}`)"
    errors = [f"{name(i, c)}: {o['ename']}: {o['evalue']}" for i, c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, "error output in " + "; ".join(errors)
    skipped = [name(i, c) for i, c in cells if c["execution_count"] is None]
    assert not skipped, "cells not run: " + "; ".join(skipped)


def test_chapter_01_in_jupyterlab(browser, project, tmp_path):
    "Chapter 01, smoke profile, run through JupyterLab's menus: no error, a plot, the metrics table, a widget progress bar, idle."
    with jupyterlab(project, tmp_path/"lab") as (base, token):
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        nb = run_in_jupyterlab(page, base, token, project, "nbs/01_introduction.ipynb")
        check_ran_clean(nb)
        params = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        assert "".join(params["source"]).startswith(SMOKE_LINE)  # the edit typed into the cell is what ran
        outputs = page.locator(".jp-OutputArea-output")
        assert outputs.locator("img").count() >= 1, "no plot shown"
        table = outputs.locator("table", has_text="answer p50 (ms)")
        assert table.count() == 1 and table.locator("tbody tr").count() == 2, "the size and latency table (base, teacher) is missing"
        bar = outputs.locator(".widget-hprogress")  # tqdm.notebook: an ipywidgets FloatProgress
        assert bar.count() >= 1, "no progress bar shown as a widget"
        assert _kernels_idle(base, token)
        for shot, target in (("chapter01-progress-widget.png", bar.first), ("chapter01-jupyterlab.png", table)):
            for _ in range(2):  # cells render as they come into view (content-visibility) and move what is below them: twice
                target.evaluate("e => e.closest('.jp-Cell').scrollIntoView({block: 'start'})")
                page.wait_for_timeout(700)
            page.screenshot(path=tmp_path/shot)
        metrics = next(Path(os.environ["SLMOPS_RUNS_ROOT"]).glob("*/01_introduction/metrics.json"))
        assert json.loads(metrics.read_text())["profile"] == "smoke"


def test_a_broken_cell_is_named(browser, project, tmp_path):
    "A cell that fails in JupyterLab (a relative path that only resolves from another folder) fails the check, naming the cell."
    path = project/"nbs"/"01_introduction.ipynb"
    nb = json.loads(path.read_text())
    at = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])) + 2
    nb["cells"].insert(at, {"cell_type": "code", "id": "broken", "metadata": {}, "execution_count": None, "outputs": [],
                            "source": ['open("nbs/01_introduction.ipynb").close()  # resolves from the repository root only']})
    path.write_text(json.dumps(nb, indent=1))
    with jupyterlab(project, tmp_path/"lab") as (base, token):
        page = browser.new_page()
        saved = run_in_jupyterlab(page, base, token, project, "nbs/01_introduction.ipynb")
    with pytest.raises(AssertionError, match=r"cell \d+ \(id broken, `open\(\"nbs/01_introduction.ipynb\"\).*FileNotFoundError"):
        check_ran_clean(saved)


def _title_block(nb: dict) -> dict:
    "Quarto's title block, rendered: the front matter's title (and description) as the page's title and first heading."
    cell = nb["cells"][0]
    src = "".join(cell["source"])
    assert cell["cell_type"] == "raw" and src.startswith("---"), f"no front matter: {src[:80]!r}"
    import yaml
    fm = yaml.safe_load(src.strip().strip("-"))
    nb["metadata"]["title"] = fm["title"]
    nb["cells"][0] = {"cell_type": "markdown", "id": "title", "metadata": {},
                      "source": f"# {fm['title']}\n\n" + (f"> {fm['description']}\n" if fm.get("description") else "")}
    return fm


def test_docs_pages(browser, project, tmp_path):
    "nbdev_proc_nbs, then every sidebar page to HTML (nbconvert for Quarto): each shows its title, tables and plots, no traceback, no tqdm flood."
    # nbdev_proc_nbs minus its Quarto check: without Quarto, nbdev_proc_nbs runs nbdev_install, which
    # would pip-install this copy over the environment's editable install. Quarto is not on these machines.
    code = ("import nbdev.doclinks; from nbdev.quarto import refresh_quarto_yml; from nbdev.serve import proc_nbs\n"
            "refresh_quarto_yml(); nbdev.doclinks._build_modidx(); proc_nbs()")
    r = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    proc = project/"_proc"
    import yaml
    cfg = yaml.safe_load((proc/"_quarto.yml").read_text())
    pages = [p for item in cfg["website"]["sidebar"]["contents"] for p in ([item] if isinstance(item, str) else item["contents"])]
    assert pages and all((proc/p).exists() for p in pages), pages
    site, expected = tmp_path/"site", {}
    site.mkdir()
    for p in pages:
        nb = json.loads((proc/p).read_text())
        outs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        expected[p] = {"title": _title_block(nb)["title"], "errors": sum(o["output_type"] == "error" for o in outs),
                       "tables": sum("<table" in "".join(o.get("data", {}).get("text/html", "")) for o in outs),
                       "plots": sum("image/png" in o.get("data", {}) for o in outs)}
        (site/Path(p).name).write_text(json.dumps(nb))
    r = subprocess.run([BIN/"jupyter", "nbconvert", "--to", "html", "--output-dir", site, *sorted(site.glob("*.ipynb"))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    page, problems = browser.new_page(viewport={"width": 1200, "height": 900}), []
    for p, want in expected.items():
        html = site/(Path(p).stem + ".html")
        page.goto(html.as_uri())
        text = page.locator("body").inner_text()
        found = {"title": page.title(), "h1": page.locator("h1").first.inner_text().strip().rstrip("¶").strip(),
                 "tables": page.locator(".jp-OutputArea-output table").count(),
                 "plots": page.locator(".jp-OutputArea-output img").count(),
                 "progress lines": len(PROGRESS_LINE.findall(text))}
        title = want["title"].replace("`", "")  # the heading shows `code` as code, without its backticks
        if found["title"].replace("`", "") != title or found["h1"] != title: problems.append(f"{p}: title {found}, expected {title!r}")
        if found["tables"] < want["tables"] or found["plots"] < want["plots"]: problems.append(f"{p}: shows {found}, expected {want}")
        if want["errors"] or "Traceback (most recent call last)" in text: problems.append(f"{p}: shows a Python traceback")
        if found["progress lines"] > 10: problems.append(f"{p}: a tqdm flood of {found['progress lines']} progress lines")
        if Path(p).stem in ("02_distillation", "04_deployment"):  # two pages, at their first plot
            page.locator(".jp-OutputArea-output img").first.evaluate("e => e.scrollIntoView({block: 'center'})")
            page.screenshot(path=tmp_path/f"docs-{Path(p).stem}.png")
    assert not problems, "\n".join(problems)
    assert sum(w["plots"] for w in expected.values()) > 0 and sum(w["tables"] for w in expected.values()) > 0
