"""dvc.yaml lists, for every stage, exactly the params keys its code reads.

Beside tests/test_stage_deps.py (the code deps): a key read but not listed lets DVC serve stale
outputs when it changes; a key listed but never read re-runs the stage for nothing. Reads are
found in the stage's code (the same files test_stage_deps follows) by the types the code
declares: a name annotated `TrainParams` is the train section, `params = load_params()` the
whole file, `self.params` what `__init__` stored there; an attribute chain down such a name is a
read of that key, and `dataclasses.asdict(section)` a read of the whole section.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params
from tests.helpers import REPO
from tests.test_stage_deps import PLUMBING, module_path, stage_code

# Reads in plumbing that are not followed (test_stage_deps.PLUMBING), listed by hand, all in
# pipeline/track/runs.py: the MLflow experiment the train stage records its run in, and where
# the split the run names as its input came from (its bytes are a dep already).
DATA_SOURCE = {"data.dataset", "data.revision", "data.train_dir", "data.eval_dir"}
PLUMBING_READS = {"train": {"register.experiment", *DATA_SOURCE}, "evaluate": DATA_SOURCE}
# Keys the analysis attributes to a section because code typed with its dataclass also serves
# another source: the reward stage fetches judge.model through pipeline/download/model.py, whose
# ModelParams it fills from judge.model, judge.revision and model.trust_remote_code; the train
# stage puts adapters on through pipeline/train/adapters.py, typed with judge.lora's
# AdapterParams, which train.lora's LoraParams extends; the eval_sets stage fetches each extra
# set through pipeline/download/shards.py with that set's columns, typed as data.columns is.
BORROWED = {
    "eval_sets": {
        f"data.columns.{key}" for key in ("prompt", "chosen", "rejected", "system", "id")
    },
    "reward": {"model.name", "model.revision", "model.allow_pickle_weights"},
    "train": {f"judge.lora.{key}" for key in ("rank", "alpha", "dropout", "target_modules")},
}


def sections() -> dict[str, tuple[str, type]]:
    """Type name -> (dotted key, dataclass) for Params and every section and subsection."""
    found = {"Params": ("", Params)}
    todo = [("", Params)]
    while todo:
        prefix, cls = todo.pop()
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                key = f"{prefix}.{name}".lstrip(".")
                found[hint.__name__] = (key, hint)
                todo.append((key, hint))
    return found


SECTIONS = sections()


def annotation_name(node: ast.expr | None) -> str | None:
    """`TrainParams`, `"TrainParams"` or `TrainParams | None` -> "TrainParams"."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.split("|")[0].strip()
    if isinstance(node, ast.BinOp):
        return annotation_name(node.left)
    return None


def typed_names(tree: ast.AST) -> dict[str, str]:
    """Name (or `self.name`) -> the section type it holds, from annotations and assignments."""
    typed: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and annotation_name(node.annotation) in SECTIONS:
            typed[node.arg] = annotation_name(node.annotation)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if getattr(node.value.func, "id", None) == "load_params":
                typed.update({t.id: "Params" for t in node.targets if isinstance(t, ast.Name)})
    for node in ast.walk(tree):  # self.x = y, self.a, self.b = a, b: y's type goes to self.x
        if isinstance(node, ast.Assign):
            targets = [t.elts if isinstance(t, ast.Tuple) else [t] for t in node.targets]
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for target, value in zip(targets[0], values, strict=False):
                if isinstance(target, ast.Attribute) and isinstance(value, ast.Name):
                    if value.id in typed and getattr(target.value, "id", None) == "self":
                        typed[f"self.{target.attr}"] = typed[value.id]
    return typed


def chain(node: ast.Attribute) -> list[str]:
    """`self.params.lora.rank` -> ["self", "params", "lora", "rank"]; [] for other bases."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else []


def resolve(names: list[str], typed: dict[str, str]) -> str | None:
    """The params key an attribute chain reads, None when it reads none."""
    for root_len in (2, 1):  # `self.params` before `params`
        root = ".".join(names[:root_len])
        if len(names) > root_len and root in typed:
            key, cls = SECTIONS[typed[root]]
            for name in names[root_len:]:
                fields = {f.name: f for f in dataclasses.fields(cls)}
                if name not in fields:
                    return None if cls is Params else key  # a method or property of a section
                key = f"{key}.{name}".lstrip(".")
                hint = typing.get_type_hints(cls)[name]
                if not dataclasses.is_dataclass(hint):
                    return key
                cls = hint
            return None  # a whole section handed on: its reads are where it is used
    return None


def reads(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typed, found = typed_names(tree), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(resolve(chain(node), typed))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "asdict":
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.Attribute):  # asdict(params.loss): the whole section
                names = chain(argument)
                root = ".".join(names[:-1])
                if root in typed and typed[root] == "Params":
                    found.add(names[-1])
            elif isinstance(argument, ast.Name) and typed.get(argument.id, "Params") != "Params":
                found.add(SECTIONS[typed[argument.id]][0])
    return found - {None}


def stage_reads(script: Path, stage: str) -> set[str]:
    files = stage_code(script) - PLUMBING
    found = set().union(*(reads(REPO / f) for f in files)) - BORROWED.get(stage, set())
    return found | PLUMBING_READS.get(stage, set())


def covered(key: str, listed: list[str]) -> bool:
    return any(key == entry or key.startswith(f"{entry}.") for entry in listed)


@pytest.fixture
def dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


def param_problems(dvc: dict) -> list[str]:
    problems = []
    for name, stage in dvc["stages"].items():
        script = module_path(re.search(r"-m (stages\.\w+)", stage["cmd"]).group(1))
        listed, read = stage.get("params", []), stage_reads(script, name)
        if missing := sorted(k for k in read if not covered(k, listed)):
            problems.append(f"{name}: reads but does not list {missing}")
        unread = [e for e in listed if not any(covered(k, [e]) or covered(e, [k]) for k in read)]
        if unread:
            problems.append(f"{name}: lists but never reads {unread}")
    return problems


def test_every_stage_lists_exactly_the_params_it_reads(dvc: dict) -> None:
    assert param_problems(dvc) == []


def test_the_guard_sees_a_key_read_and_a_key_listed_for_nothing(dvc: dict) -> None:
    assert {"loss", "eval.batch_size"} <= stage_reads(REPO / "stages" / "evaluate.py", "evaluate")
    assert "train.lora.quantize" in stage_reads(REPO / "stages" / "reference.py", "reference")
    broken = {"stages": {k: dict(v) for k, v in dvc["stages"].items()}}
    broken["stages"]["subsample"]["params"] = ["data.fraction", "data.seed", "train.lr"]
    problems = param_problems(broken)
    assert "subsample: reads but does not list ['data.eval_size']" in problems
    assert "subsample: lists but never reads ['train.lr']" in problems
