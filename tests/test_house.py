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


def test_chapters_open_with_one_context_call_and_build_no_task():
    for nb in CHAPTERS:
        code = "\n".join(_code_cells(nb))
        assert "task_from_params" not in code, f"{nb.name} builds its task: open_chapter does"
        assert code.count("open_chapter(") == 1, f"{nb.name}: {code.count('open_chapter(')} open_chapter calls"


def test_only_artifacts_derives_the_run_folder():
    derive = re.compile(r"\b(chapter_out|out)\)?(\.resolve\(\))?\.parent\b")  # a chapter's folder's parent
    files = {p.name for p in LIBRARY for line in p.read_text().splitlines() if derive.search(line)}
    assert files == {"artifacts.py"}, f"the run folder is worked out in {sorted(files)}: use artifacts.run_folder"


def test_no_function_takes_more_than_eight_parameters():
    many = [f"{name}:{f.name} ({_parameters(f)})" for name, f in _functions() if _parameters(f) > 8]
    assert not many, many


def _defined(cell: str) -> list[str]:
    "The public functions and classes an export cell defines (methods grown with @patch are their class's)."
    tree = ast.parse(cell)
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not n.name.startswith("_") and not any(getattr(d, "id", None) == "patch" for d in n.decorator_list)]


def test_exported_names_have_examples():
    "At most 10% of the exported functions and classes go without an example (a code cell after theirs that uses them)."
    names, missing = 0, []
    for nb in sorted((ROOT/"nbs").glob("*.ipynb")):
        cells = _code_cells(nb)
        for i, cell in enumerate(cells):
            if not re.match(r"\s*#\|\s*export\b", cell): continue
            examples = "\n".join(c for c in cells[i + 1:] if not re.match(r"\s*#\|\s*export", c))
            for name in _defined(cell):
                names += 1
                if not re.search(rf"\b{re.escape(name)}\b", examples): missing.append(f"{nb.stem}:{name}")
    assert len(missing) <= 0.1*names, f"{len(missing)} of {names} exported names without an example: {missing}"


def test_imports_live_in_the_import_cell():
    "The docs build (nbdev's proc_nbs) runs export cells and cells that import, alone: an example cell that imports runs without the cells it needs."
    mixed = []
    for nb in sorted((ROOT/"nbs").glob("*.ipynb")):
        cells = _code_cells(nb)
        first = next((i for i, s in enumerate(cells) if re.search(r"^(from \S+ )?import ", s, re.M)), len(cells))  # the import cell
        for i, s in enumerate(cells[first + 1:], first + 1):
            lines = [l for l in s.splitlines() if l.strip() and not l.lstrip().startswith("#")]
            imports = [l for l in lines if re.match(r"\s*(from \S+ )?import ", l)]
            if imports and len(imports) < len(lines) and not re.match(r"\s*#\|\s*export", s): mixed.append(f"{nb.name} code cell {i}")
    assert not mixed, f"an example cell imports: move its imports to the notebook's import cell: {mixed}"
