"""The optional features' dependencies are extras (pyproject.toml: tune, report): nothing imports
them at module level, and a command that needs a missing one says which extra, in one line."""

import subprocess
import sys

import pytest

from tests.helpers import REPO

OPTIONAL = ("optuna", "matplotlib", "vl_convert")


def run_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where the `blocked` modules cannot be imported."""
    prelude = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True
    )


def test_the_modules_that_use_an_extra_import_without_it() -> None:
    modules = ("pipeline.tune", "pipeline.tune_results", "pipeline.report", "pipeline.compare")
    done = run_without(OPTIONAL, "".join(f"import {m}\n" for m in modules))
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("module", "missing", "extra", "command"),
    [
        ("pipeline.tune", "optuna", "tune", "python -m pipeline.tune"),
        ("pipeline.report", "vl_convert", "report", "make report"),
    ],
)
def test_a_missing_extra_is_one_line_that_names_it(
    module: str, missing: str, extra: str, command: str
) -> None:
    code = (
        f"sys.argv = ['{module}']\n"
        "from pipeline.stage_io import run_stage\n"
        f"import {module} as command\n"
        "run_stage(command.main)\n"
    )
    done = run_without((missing,), code)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {command} needs {missing}, from the {extra} extra: pip install -e "
        f"'.[{extra}]' (make install installs it)"
    ]
