"""A stage process takes its share of the machine, not all of it.

DVC's queue runs experiments in parallel (`dvc queue start -j N`), each stage in its own process.
Left alone, every process would use every CPU core (two workers then run slower than one) and
every GPU stage would land on cuda:0. So each torch stage claims, under file locks kept in one
folder of the repository (`DVC_ROOT` for temporary and queued experiments):

* a worker slot: its torch threads are the cores divided by the slots held, re-divided every few
  seconds while training (`Share.rebalance`), so a stage that started alone gives cores back when
  a second starts and takes them again when it ends;
* on CUDA machines, free GPUs: one lock per device; a stage of train.nproc processes takes that
  many at once (or waits until they are free) and its ranks see only those.

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

from pipeline.model.loading import Runtime, resolve_runtime
from pipeline.params import Device
from pipeline.stage_io import repo_root

POLL_SECONDS = 1.0
REBALANCE_SECONDS = 2.0


@dataclasses.dataclass
class Share:
    threads: int  # torch intra-op threads for this process
    gpus: tuple[int, ...]  # CUDA devices claimed (empty on a CPU)
    folder: Path | None = None  # the lock folder (None: nothing to re-divide)
    cores: int = 1  # the cores divided among the worker slots
    checked: float = dataclasses.field(default_factory=time.monotonic)

    def rebalance(self) -> None:
        """Re-divide the cores by the slots held now and set torch's threads to the result. Cheap
        to call after every step: it looks at most every REBALANCE_SECONDS."""
        if self.folder is None or time.monotonic() - self.checked < REBALANCE_SECONDS:
            return
        self.checked = time.monotonic()
        threads = max(1, self.cores // max(1, _held(self.folder, "worker")))
        if threads != self.threads:
            self.threads = threads
            torch.set_num_threads(threads)


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


def _take_slots(folder: Path, slots: int) -> list[FileLock]:
    """`slots` worker-slot locks: the first free numbers."""
    taken: list[FileLock] = []
    number = 0
    while len(taken) < slots:
        if (lock := _try(folder / f"worker-{number}.lock")) is not None:
            taken.append(lock)
        number += 1
    return taken


def _take_gpus(folder: Path, devices: int, wanted: int) -> tuple[list[FileLock], list[int]]:
    """`wanted` free GPUs of `devices`, all at once: a partial set is given back and tried again
    later, so two stages each holding part of what the other needs never wait on each other."""
    while True:
        taken: list[tuple[FileLock, int]] = []
        for device in range(devices):
            if len(taken) < wanted and (lock := _try(folder / f"cuda-{device}.lock")) is not None:
                taken.append((lock, device))
        if len(taken) == wanted:
            return [lock for lock, _ in taken], [device for _, device in taken]
        for lock, _ in taken:
            lock.release()
        time.sleep(POLL_SECONDS)  # not enough free GPUs: wait for a stage to finish


@contextlib.contextmanager
def claim(
    folder: Path, cores: int, devices: int, gpus_wanted: int, slots: int = 1
) -> Iterator[Share]:
    """Hold `slots` worker slots (one per process the stage runs) and `gpus_wanted` of `devices`
    GPUs (waiting for free ones) meanwhile. Threads are per process."""
    locks: list[FileLock] = []
    try:
        locks += _take_slots(folder, slots)
        gpu_locks, gpus = _take_gpus(folder, devices, min(gpus_wanted, devices))
        locks += gpu_locks
        # Counted once the GPUs are ours: waiting for them, the stages running may have changed.
        workers = _held(folder, "worker")  # ours included: a second lock on it is refused too
        yield Share(max(1, cores // max(1, workers)), tuple(gpus), folder, cores)
    finally:
        for lock in reversed(locks):
            lock.release()


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def stage_share(device: str, processes: int = 1) -> Iterator[Share]:
    """`claim` for a stage running `processes` processes on `device` (train.device or
    eval.device), held for as long as the stage runs: torch threads set to one process's share of
    the cores and, on CUDA, `processes` GPUs, the first made the current device. A torchrun rank
    claims nothing: its launcher (`stages/train.py`) claimed for every rank and made only those
    GPUs visible; the rank still re-divides the cores as stages come and go."""
    folder, cores = lock_folder(repo_root()), available_cores()
    if "LOCAL_RANK" in os.environ:
        yield Share(torch.get_num_threads(), (), folder, cores)
        return
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    devices = torch.cuda.device_count() if cuda else 0
    with claim(folder, cores, devices, processes, slots=processes) as share:
        torch.set_num_threads(share.threads)
        if share.gpus:
            torch.cuda.set_device(share.gpus[0])
        yield share


@contextlib.contextmanager
def on_device(device: Device) -> Iterator[Runtime]:
    """A one-process stage on `device` (eval.device, judge.device, ...): its runtime, used inside
    the stage's share of the machine (`stage_share`) for as long as the block runs."""
    runtime = resolve_runtime(device)
    with stage_share(device):
        yield runtime


def rank_environment(share: Share) -> dict[str, str]:
    """What a launcher passes to the ranks it starts: only the claimed GPUs visible (rank i
    takes the i-th), and each rank's share of the cores."""
    env = {"OMP_NUM_THREADS": str(share.threads)}
    if share.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in share.gpus)
    return env
