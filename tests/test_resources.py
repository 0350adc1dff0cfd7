"""Stage processes share the machine: worker slots set the torch threads, GPUs are claimed one per
stage from the free ones, and a crashed stage releases what it held. Fake device counts: no GPU
is needed (a second lock on the same file is refused within one process too, so nested claims
stand for concurrent stages)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.resources import claim

REPO = Path(__file__).resolve().parents[1]


def test_concurrent_stages_split_the_cores_and_take_different_gpus(tmp_path: Path) -> None:
    with claim(tmp_path, cores=8, devices=2, gpus_wanted=1) as first:
        assert first.threads == 8 and first.gpus == (0,)
        with claim(tmp_path, cores=8, devices=2, gpus_wanted=1) as second:
            assert second.threads == 4 and second.gpus == (1,)
    with claim(tmp_path, cores=8, devices=2, gpus_wanted=2) as alone:  # all released again
        assert alone.threads == 8 and alone.gpus == (0, 1)


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
