"""A stage's expected failures are one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO


def run_stage(stage: str, workdir: Path, **params: dict) -> subprocess.CompletedProcess:
    """`python -m stages.<stage>` in `workdir` with params.yaml changed by `params`."""
    settings = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for section, values in params.items():
        settings[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    shutil.copy(REPO / "dvc.yaml", workdir / "dvc.yaml")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf-home"),  # an empty hub cache: nothing to fall back on
    }
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_bad_param_is_one_line_naming_the_key(tmp_path: Path) -> None:
    done = run_stage("train", tmp_path, train={"lr": "abc"})
    assert done.returncode == 1
    assert done.stderr.strip() == "error: train.lr must be a number, got 'abc'"


@pytest.mark.slow
def test_an_unreachable_hub_says_what_to_do_in_one_line(tmp_path: Path) -> None:
    done = run_stage("download_model", tmp_path)  # the real params: Qwen/Qwen3-0.6B from the hub
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.name: cannot get 'Qwen/Qwen3-0.6B' from the Hugging")
    assert "make demo" in last and "local folder" in last
    assert not (tmp_path / "models" / "base").exists()  # nothing half-written


@pytest.mark.slow
def test_a_local_model_folder_that_does_not_exist_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    done = run_stage("download_model", tmp_path, model={"name": str(missing)})
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: model.name: no folder at '{missing}' (and not a hub id)"


def test_sigterm_is_one_interrupted_line_and_exit_130(tmp_path: Path) -> None:
    """A stage stopped by SIGTERM (as by Ctrl-C) says so in one line; nothing is left behind."""
    import signal
    import time

    script = tmp_path / "slow_stage.py"
    script.write_text(
        "import time\nfrom pipeline.stage_io import run_stage\n"
        "run_stage(lambda: (print('ready', flush=True), time.sleep(60)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stage = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert stage.stdout.readline() == "ready\n"
    time.sleep(0.2)
    stage.send_signal(signal.SIGTERM)
    _, stderr = stage.communicate(timeout=60)
    assert stage.returncode == 130
    assert stderr.strip() == "interrupted: slow_stage: no output written"


def test_ctrl_c_through_the_demos_stage_shell_ends_with_the_stages_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DVC runs a stage as `$SHELL -c CMD`; a terminal's Ctrl-C reaches the shell and the stage.
    With SHELL unset (/bin/sh, dash on Debian), as on CI machines, the shell died of the SIGINT
    and DVC reported "exited with -2"; the demo's environment picks a shell that waits."""
    import signal

    from demo.experiment import venv_env

    script = tmp_path / "slow_stage.py"
    script.write_text(
        "import time\nfrom pipeline.stage_io import run_stage\n"
        "run_stage(lambda: (print('ready', flush=True), time.sleep(60)))\n"
    )
    monkeypatch.delenv("SHELL", raising=False)
    env = {**venv_env(), "PYTHONPATH": str(REPO)}
    command = [env.get("SHELL", "/bin/sh"), "-c", f"{sys.executable} {script}"]  # as DVC runs it
    shell = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert shell.stdout.readline() == "ready\n"
    os.killpg(shell.pid, signal.SIGINT)  # to the whole group, as a terminal sends it
    _, stderr = shell.communicate(timeout=60)
    assert shell.returncode == 130, stderr
    assert stderr.strip() == "interrupted: slow_stage: no output written"
