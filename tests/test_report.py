"""`make report` with no REV: the workspace when it has figures, else the newest DVC experiment,
else one line naming what to run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.report import WORKSPACE, rev_to_report
from tests.e2e import git


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    git(tmp_path, "init", "-q")
    (tmp_path / "a").write_text("a")
    git(tmp_path, "add", "a")
    git(tmp_path, "commit", "-q", "-m", "first")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def experiment(repo: Path, name: str, date: str) -> None:
    """An experiment ref as DVC writes one (refs/exps/<xx>/<baseline>/<name>), dated `date`."""
    head = git(repo, "rev-parse", "HEAD").strip()
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    env = {
        **os.environ,
        "GIT_COMMITTER_DATE": date,
        "GIT_AUTHOR_DATE": date,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@l",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@l",
    }
    command = ["git", "commit-tree", tree, "-p", head, "-m", name]
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, check=True)
    commit = done.stdout.strip()
    git(repo, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/{name}", commit)


def test_a_workspace_with_figures_is_reported_itself(repo: Path) -> None:
    (repo / "metrics").mkdir()
    (repo / "metrics" / "eval.json").write_text("{}")
    assert rev_to_report(WORKSPACE) == WORKSPACE
    assert rev_to_report("main") == "main"


def test_without_figures_the_newest_experiment_is_reported_and_said(
    repo: Path, capsys: pytest.CaptureFixture
) -> None:
    experiment(repo, "older", "2026-12-01T10:00:00")
    experiment(repo, "newer", "2026-12-02T10:00:00")
    assert rev_to_report(WORKSPACE) == "newer"
    assert "reporting the newest experiment, newer" in capsys.readouterr().err


def test_with_nothing_to_report_one_line_says_what_to_run(
    repo: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        rev_to_report(WORKSPACE)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: no figures in the workspace and no DVC experiment")
    assert "make demo" in line
