"""Stage processes share the machine: worker slots set the torch threads (re-divided as stages come
and go), GPUs are claimed from the free ones (train.nproc of them at once), and a crashed stage
releases what it held. Fake device counts: no GPU
is needed (a second lock on the same file is refused within one process too, so nested claims
stand for concurrent stages)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.resources import Share, claim, rank_environment
from tests.helpers import REPO


def test_concurrent_stages_split_the_cores_and_take_different_gpus(tmp_path: Path) -> None:
    with claim(tmp_path, cores=8, devices=2, gpus_wanted=1) as first:
        assert first.threads == 8 and first.gpus == (0,)
        with claim(tmp_path, cores=8, devices=2, gpus_wanted=1) as second:
            assert second.threads == 4 and second.gpus == (1,)
    with claim(tmp_path, cores=8, devices=2, gpus_wanted=2) as alone:  # all released again
        assert alone.threads == 8 and alone.gpus == (0, 1)


@pytest.mark.slow
def test_a_stage_waits_for_a_free_gpu(tmp_path: Path) -> None:
    got: list[tuple[int, ...]] = []

    def later_stage() -> None:
        with claim(tmp_path, cores=2, devices=1, gpus_wanted=1) as share:
            got.append(share.gpus)

    with claim(tmp_path, cores=2, devices=1, gpus_wanted=1):
        waiting = threading.Thread(target=later_stage)
        waiting.start()
        time.sleep(1.5)
        assert got == []  # the only GPU is busy: it waits
    waiting.join(timeout=10)
    assert got == [(0,)]


@pytest.mark.slow
def test_a_crashed_stage_releases_its_claims(tmp_path: Path) -> None:
    crash = (
        "import os, sys; from pathlib import Path; from pipeline.resources import claim\n"
        "with claim(Path(sys.argv[1]), 2, 1, 1):\n"
        "    os._exit(3)  # no cleanup runs: only the OS releases the locks\n"
    )
    done = subprocess.run([sys.executable, "-c", crash, str(tmp_path)], cwd=REPO, timeout=120)
    assert done.returncode == 3
    with claim(tmp_path, cores=2, devices=1, gpus_wanted=1) as share:
        assert share.gpus == (0,) and share.threads == 2


def test_a_multi_process_stage_takes_its_gpus_all_at_once(tmp_path: Path) -> None:
    with claim(tmp_path, cores=8, devices=4, gpus_wanted=2, slots=2) as first:
        assert first.gpus == (0, 1) and first.threads == 4  # per process: 2 slots held
        with claim(tmp_path, cores=8, devices=4, gpus_wanted=2, slots=2) as second:
            assert second.gpus == (2, 3) and second.threads == 2
        env = rank_environment(second)
        assert env == {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert rank_environment(Share(2, ())) == {"OMP_NUM_THREADS": "2"}  # CPU: nothing to hide


@pytest.mark.slow
def test_a_partial_set_of_gpus_is_not_held_while_waiting(tmp_path: Path) -> None:
    got: list[tuple[int, ...]] = []

    def wants_two() -> None:
        with claim(tmp_path, cores=2, devices=2, gpus_wanted=2) as share:
            got.append(share.gpus)

    with claim(tmp_path, cores=2, devices=2, gpus_wanted=1) as one:
        assert one.gpus == (0,)
        waiting = threading.Thread(target=wants_two)
        waiting.start()
        time.sleep(1.5)
        # GPU 1 is free but taking it alone would block a stage that needs just one more.
        with claim(tmp_path, cores=2, devices=2, gpus_wanted=1) as other:
            assert other.gpus == (1,)
        assert got == []
    waiting.join(timeout=10)
    assert got == [(0, 1)]


def test_a_running_stage_gives_cores_back_and_takes_them_again(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        with claim(tmp_path, cores=2, devices=0, gpus_wanted=0) as first:
            assert first.threads == 2
            with claim(tmp_path, cores=2, devices=0, gpus_wanted=0):
                first.checked = 0.0  # as if the last look were long ago
                first.rebalance()
                assert first.threads == 1 and torch.get_num_threads() == 1
                first.rebalance()  # too soon to look again: nothing changes
            assert first.threads == 1
            first.checked = 0.0
            first.rebalance()
            assert first.threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_train_stage_starts_its_ranks_with_the_claimed_share(
    tmp_path: Path, params_file: Path, monkeypatch
) -> None:
    import stages.train as stage
    from pipeline.resources import available_cores
    from pipeline.train import setup

    params_file.write_text(params_file.read_text().replace("nproc: 1 ", "nproc: 2 "))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    seen: dict = {}

    def fake_run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        seen.update(cmd=cmd, env=env, held=len(list((tmp_path / ".dvc/tmp/resources").glob("*"))))
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(setup.subprocess, "run", fake_run)
    with pytest.raises(SystemExit) as done:
        stage.main()
    assert done.value.code == 3  # the ranks' exit status is the stage's
    assert seen["cmd"][1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "stages.train",
    ]
    assert seen["env"]["OMP_NUM_THREADS"] == str(max(1, available_cores() // 2))
    assert seen["held"] == 2  # one worker slot per rank while they run
