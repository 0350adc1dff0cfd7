"""A stage process takes its share of the machine, not all of it.

DVC's queue runs experiments in parallel (`dvc queue start -j N`), each stage in its own process.
Left alone, every process would use every CPU core (two workers then run slower than one) and
every GPU stage would land on cuda:0. So each torch stage claims, under file locks kept in one
folder of the repository (`DVC_ROOT` for temporary and queued experiments):

* a worker slot: its torch threads are the cores divided by the slots held at that moment;
* on CUDA machines, free GPUs: one lock per device, taken without waiting where free.

An OS file lock dies with its process, so a crash releases everything it held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from pipeline.stage_io import repo_root

POLL_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Share:
    threads: int  # torch intra-op threads for this process
    gpus: tuple[int, ...]  # CUDA devices claimed (empty on a CPU)


def lock_folder(root: Path) -> Path:
    folder = root / ".dvc" / "tmp" / "resources"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _try(lock_path: Path) -> FileLock | None:
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _held(folder: Path, prefix: str) -> int:
    """How many `prefix-*` locks are held right now (flock: by this process too)."""
    held = 0
    for path in folder.glob(f"{prefix}-*.lock"):
        lock = _try(path)
        if lock is None:
            held += 1
        else:
            lock.release()
    return held


@contextlib.contextmanager
def claim(folder: Path, cores: int, devices: int, gpus_wanted: int) -> Iterator[Share]:
    """Hold a worker slot and `gpus_wanted` of `devices` GPUs (waiting for free ones) meanwhile."""
    locks: list[FileLock] = []
    try:
        slot = 0
        while (lock := _try(folder / f"worker-{slot}.lock")) is None:
            slot += 1
        locks.append(lock)
        workers = _held(folder, "worker")  # ours included: a second lock on it is refused too
        gpus: list[int] = []
        while len(gpus) < min(gpus_wanted, devices):
            for device in range(devices):
                if device not in gpus and len(gpus) < gpus_wanted:
                    if (lock := _try(folder / f"cuda-{device}.lock")) is not None:
                        locks.append(lock)
                        gpus.append(device)
            if len(gpus) < min(gpus_wanted, devices):
                time.sleep(POLL_SECONDS)  # every GPU busy: wait for a stage to finish
        yield Share(threads=max(1, cores // max(1, workers)), gpus=tuple(gpus))
    finally:
        for lock in reversed(locks):
            lock.release()


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def stage_share(device: str) -> Iterator[Share]:
    """`claim` for a stage process running on `device` (train.device or eval.device): torch
    threads set to its share of the cores and, on CUDA, the claimed GPU made the current device,
    for as long as the stage runs. Under torchrun with several processes each rank's GPU is its
    LOCAL_RANK, so only the threads are shared."""
    gpus_wanted = 1 if int(os.environ.get("WORLD_SIZE", "1")) == 1 else 0
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    devices = torch.cuda.device_count() if cuda else 0
    with claim(lock_folder(repo_root()), available_cores(), devices, gpus_wanted) as share:
        torch.set_num_threads(share.threads)
        if share.gpus:
            torch.cuda.set_device(share.gpus[0])
        yield share
