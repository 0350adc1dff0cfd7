"""Data parallelism under torchrun: process group, model wrapping, per-rank batches, reductions.

A global micro-batch of `batch_size * world` pairs is cut into one slice per rank, so N processes
with batch_size B take the same optimizer steps as one process with batch_size N*B. Gradients
are averaged by DDP (NCCL on CUDA, gloo on CPU); metrics are summed across ranks before rank 0
logs them. Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipeline.modeling import Runtime


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(runtime: Runtime) -> tuple[World, Runtime]:
    """Join torchrun's process group (if launched by it); on CUDA each rank takes its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(), runtime
    if runtime.device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        runtime = dataclasses.replace(runtime, device=torch.device("cuda", local))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if runtime.device.type == "cuda" else "gloo")
    return current_world(), runtime


def wrap(model: torch.nn.Module, world: World, runtime: Runtime) -> torch.nn.Module:
    """DDP around the policy scorer when there is more than one process."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def rank_slice(global_micro: np.ndarray, world: World) -> np.ndarray:
    """This rank's share of a global micro-batch (sizes differ by at most one pair)."""
    return np.array_split(global_micro, world.size)[world.rank]


def usable_order(order: np.ndarray, world: World) -> np.ndarray:
    """Drop the last < world pairs of an epoch, so that every rank gets at least one pair."""
    remainder = len(order) % world.size
    return order[: len(order) - remainder] if world.size > 1 and remainder else order


def all_reduce_sum(values: list[float], device: torch.device, world: World) -> list[float]:
    """Element-wise sum of `values` over ranks (float64, so sums of many pairs stay exact)."""
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


@contextlib.contextmanager
def no_sync_unless(last: bool, model: torch.nn.Module) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps; sync on the step's last one."""
    if last or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
