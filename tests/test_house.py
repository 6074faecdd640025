"""The shape of the house, read from its files: line lengths, parameters, export cells, child processes, chapters."""
import ast
import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [p for p in sorted((ROOT/"slmops_nb").glob("*.py")) if p.name != "_modidx.py"]
CHAPTERS = sorted((ROOT/"nbs").glob("0[1-9]_*.ipynb"))


def _code_cells(nb: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]


def _export_cells() -> list[str]:
    return [s for nb in sorted((ROOT/"nbs").glob("*.ipynb")) for s in _code_cells(nb) if re.match(r"\s*#\|\s*export", s)]


def _functions():
    for p in LIBRARY:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)): yield p.name, node


def _parameters(f) -> int:
    a = f.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    return len(names) - bool(names and names[0].arg in ("self", "cls")) + bool(a.vararg) + bool(a.kwarg)


def test_library_lines_are_at_most_120_characters():
    lines = [(p.name, i, l) for p in LIBRARY for i, l in enumerate(p.read_text().splitlines(), 1)]
    long = [f"{n}:{i}" for n, i, l in lines if len(l) > 120]
    assert len(long) <= 0.02*len(lines), f"{len(long)} of {len(lines)} lines over 120 characters: {long[:20]}"


def test_chapter_modules_are_named_after_their_notebooks():
    for nb in CHAPTERS:
        exp = re.search(r"#\|\s*default_exp\s+(\S+)", "\n".join(_code_cells(nb)))
        assert exp and exp.group(1) == nb.stem.split("_", 1)[1], f"{nb.name}: default_exp {exp and exp.group(1)}"


def test_export_cells_are_short():
    sizes = [len(s.splitlines()) - 1 for s in _export_cells()]
    assert max(sizes) <= 60, f"an export cell of {max(sizes)} lines"
    assert statistics.median(sizes) <= 12, f"median export cell {statistics.median(sizes)} lines"


def test_children_run_modules_not_code_strings():
    strings = [p.name for p in LIBRARY if re.search(r'sys\.executable\s*,\s*["\']-c["\']', p.read_text())]
    assert not strings, f"Python code handed to a child as a -c string in {strings}: use child.child_command"


def test_core_holds_no_process_pool():
    core = (ROOT/"slmops_nb"/"core.py").read_text()
    assert "ProcessPoolExecutor" not in core and "multiprocessing" not in core
