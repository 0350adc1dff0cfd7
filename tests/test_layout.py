"""The shape of the code. The library holds what the pipeline runs: every public name defined at
the top of a module in pipeline/ or stages/ is used by the pipeline, its stages, the demo, the
benches or the Makefile, not by tests alone (a helper only tests call belongs in tests/). No
function takes more than MAX_PARAMETERS: more are grouped into what they describe together. And a
stage script reads params, calls the library and writes outputs: STAGE_LINES lines at most, from
at most STAGE_IMPORTS pipeline modules. No module is over MODULE_LINES lines."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

from tests.helpers import REPO

USERS = ("pipeline", "stages", "bench", "demo", ".ci")
WORD = re.compile(r"\w+")
MAX_PARAMETERS = 7  # self and cls not counted
STAGE_LINES, STAGE_IMPORTS = 45, 6
MODULE_LINES = 300


def top_level_names(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in names if not n.startswith("_") and n != "main"]


def used_only_by_tests(defined: dict[Path, list[str]], production: str, tests: str) -> list[str]:
    """`module: name` for each name whose only mention outside its definition is in `tests`."""
    in_production, in_tests = Counter(WORD.findall(production)), set(WORD.findall(tests))
    return [
        f"{path.relative_to(REPO)}: {name}"
        for path, names in defined.items()
        for name in names
        if in_production[name] <= 1 and name in in_tests  # 1: its definition
    ]


def read(paths: list[Path]) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def test_no_production_name_is_used_by_tests_alone() -> None:
    library = [p for folder in ("pipeline", "stages") for p in (REPO / folder).rglob("*.py")]
    users = [p for folder in USERS for p in (REPO / folder).rglob("*.py")]
    production = read([*users, REPO / "dvc.yaml", REPO / "Makefile"])
    tests = read(sorted((REPO / "tests").rglob("*.py")))
    defined = {p: top_level_names(p) for p in library}
    assert used_only_by_tests(defined, production, tests) == []


def test_a_name_only_tests_use_is_found(tmp_path: Path) -> None:
    module = tmp_path / "mod.py"
    module.write_text("def kept(): ...\ndef tested(): ...\nLIMIT = 3\n", encoding="utf-8")
    defined = {module: top_level_names(module)}
    found = used_only_by_tests(
        {REPO / "x.py": defined[module]}, "def kept(): ...\nkept()\nLIMIT = 3\n", "tested(); kept()"
    )
    assert defined[module] == ["kept", "tested", "LIMIT"]
    assert found == ["x.py: tested"]


def wide_functions(path: Path, root: Path = REPO) -> list[str]:
    """`module:line name (count)` for each function of `path` with over MAX_PARAMETERS."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            count = len([a for a in named if a.arg not in ("self", "cls")])
            if count > MAX_PARAMETERS:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({count})")
    return found


def test_no_function_takes_more_than_seven_parameters() -> None:
    code = [p for folder in ("pipeline", "stages", "bench") for p in (REPO / folder).rglob("*.py")]
    assert [found for path in code for found in wide_functions(path)] == []


def test_a_wide_function_is_found(tmp_path: Path) -> None:
    module = tmp_path / "wide.py"
    module.write_text(
        "class C:\n    def m(self, a, b, c, d, e, f, g): ...\n"
        "def w(a, b, c, d, e, f, g, *, h): ...\n",
        encoding="utf-8",
    )
    assert wide_functions(module, tmp_path) == ["wide.py:3 w (8)"]


def stage_shape(path: Path) -> tuple[int, int]:
    """(lines, pipeline modules imported) of a stage script."""
    text = path.read_text(encoding="utf-8")
    imported = {
        node.module
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline")
    }
    return len(text.splitlines()), len(imported)


def test_every_stage_script_is_thin() -> None:
    thick = {
        path.name: shape
        for path in (REPO / "stages").glob("*.py")
        if (shape := stage_shape(path))[0] > STAGE_LINES or shape[1] > STAGE_IMPORTS
    }
    assert thick == {}, f"over {STAGE_LINES} lines or {STAGE_IMPORTS} pipeline imports"


def test_a_thick_stage_is_measured(tmp_path: Path) -> None:
    stage = tmp_path / "s.py"
    imports = "".join(f"from pipeline.m{i} import x\n" for i in range(7))
    stage.write_text(imports + "from pipeline.m0 import y\nimport os\n", encoding="utf-8")
    assert stage_shape(stage) == (9, 7)


def test_the_library_and_its_stages_import_nothing_of_the_demo() -> None:
    code = [p for folder in ("pipeline", "stages") for p in (REPO / folder).rglob("*.py")]
    importers = []
    for path in code:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] == "demo" for n in names):
                importers.append(str(path.relative_to(REPO)))
    assert importers == []


def test_no_module_is_over_300_lines() -> None:
    code = [p for folder in USERS[:4] for p in (REPO / folder).rglob("*.py")]
    long = {
        str(p.relative_to(REPO)): n
        for p in code
        if (n := len(p.read_text().splitlines())) > MODULE_LINES
    }
    assert long == {}
