"""dvc.yaml lists, for every stage, exactly the code that decides its outputs.

The code of a stage is its script under stages/ plus every pipeline/ module it imports, directly
or through other modules, and the data files those modules name (texts.yaml, serving.py). A dep
missing from dvc.yaml lets DVC serve stale outputs; a dep listed but never imported re-runs an
expensive stage for nothing. A folder dep counts as every file in it.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

# Modules that decide how a stage reads params, writes files, logs to MLflow and stops, never the
# values of its outputs. They are not deps (adding a train setting must not re-download the
# model), and their own imports are not followed.
PLUMBING = frozenset(
    {
        "pipeline/params.py",
        "pipeline/strict_yaml.py",
        "pipeline/stage_io.py",
        "pipeline/stopping.py",
        "pipeline/track/runs.py",
    }
)


def module_path(name: str) -> Path | None:
    """The file of a module of this repository (`pipeline.model.scoring`), None for others."""
    if name.split(".")[0] not in ("pipeline", "stages", "demo"):
        return None
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """Files of this repository that `path` imports anywhere in its body (functions included)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pipeline.model import reference` imports the submodule when there is one.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(p for p in map(module_path, names) if p is not None)
    return found


def named_files(path: Path) -> set[Path]:
    """Files beside `path` that it names in a string literal (data it reads, code it ships)."""
    strings = {
        node.value
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    return {p for p in path.parent.iterdir() if p.is_file() and p.name in strings}


def stage_code(script: Path) -> set[str]:
    """The stage script and everything it reaches, as repository-relative paths."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if rel(path) in PLUMBING:
            continue
        todo += [p for p in imported_files(path) | named_files(path) if p.suffix == ".py"]
        seen |= {p for p in named_files(path) if p.suffix != ".py"}
    return {rel(p) for p in seen if p.name != "__init__.py" and rel(p) not in PLUMBING}


def listed_code(deps: list[str]) -> set[str]:
    """The code deps of a stage with folders expanded into their files."""
    files: set[str] = set()
    for dep in deps:
        if not dep.startswith(("pipeline", "stages")):
            continue  # data and model folders
        path = REPO / dep
        if path.is_dir():
            files |= {
                rel(p) for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            }
        else:
            files.add(dep)
    return {f for f in files if not f.endswith("__init__.py")}


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def dep_problems(dvc: dict) -> list[str]:
    """One line per stage whose code deps differ from what its script imports."""
    problems = []
    for name, stage in dvc["stages"].items():
        script = re.search(r"-m (stages\.\w+)", stage["cmd"])
        assert script, f"stage {name}: cmd does not run a stages/ module"
        needed = stage_code(module_path(script.group(1)))
        listed = listed_code(stage.get("deps", []))
        if missing := sorted(needed - listed):
            problems.append(f"{name}: imports but does not list {missing}")
        if extra := sorted(listed - needed):
            problems.append(f"{name}: lists but does not import {extra}")
    return problems


@pytest.fixture
def dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


def test_every_stage_lists_exactly_the_code_it_imports(dvc: dict) -> None:
    assert dep_problems(dvc) == []


def test_a_missing_and_a_superfluous_dep_are_both_reported(dvc: dict) -> None:
    broken = copy.deepcopy(dvc)
    broken["stages"]["subsample"]["deps"].remove("pipeline/data/schema.py")
    broken["stages"]["train"]["deps"].append("pipeline/evaluate/ranking.py")
    assert dep_problems(broken) == [
        "subsample: imports but does not list ['pipeline/data/schema.py']",
        "train: lists but does not import ['pipeline/evaluate/ranking.py']",
    ]


def test_a_folder_dep_covers_its_files_and_a_data_file_counts(dvc: dict) -> None:
    # Data a module reads counts as its code (the demo's wording, read by its generator).
    assert "demo/texts.yaml" in stage_code(REPO / "demo" / "dataset.py")
    assert "pipeline/model/scoring.py" in listed_code(["pipeline/model"])
    broken = copy.deepcopy(dvc)
    broken["stages"]["evaluate"]["deps"].append("pipeline/train")
    assert any(p.startswith("evaluate: lists but does not import") for p in dep_problems(broken))


def test_plumbing_is_not_followed_into_the_loss_formulas() -> None:
    # params.py names the loss variants; the download stage must not depend on their formulas
    # (a new loss variant must not re-download the model).
    assert "pipeline/objective/losses.py" not in stage_code(REPO / "stages" / "download_model.py")


def test_no_stage_depends_on_the_demo(dvc: dict) -> None:
    """The demo hands the stages ordinary local folders: editing its generator or wording never
    re-runs a real project's download."""
    for name, stage in dvc["stages"].items():
        script = re.search(r"-m (stages\.\w+)", stage["cmd"]).group(1)
        code = stage_code(module_path(script)) | listed_code(stage.get("deps", []))
        assert not any(path.startswith("demo") for path in code), name
