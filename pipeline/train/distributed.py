"""Data parallelism under torchrun: process group, model wrapping, per-rank batches, reductions.

A global micro-batch of `batch_size * world` pairs is cut into one slice per rank, so N processes
with batch_size B take the same optimizer steps as one process with batch_size N*B. Gradients
are averaged by DDP (NCCL on CUDA, gloo on CPU), or, with `train.parallel: fsdp`, reduce-scattered
by FSDP2 (`fully_shard`: every decoder layer and the rest sharded across ranks, for models whose
weights, gradients and AdamW state do not fit one GPU). Metrics are summed across ranks before
rank 0 logs them. Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from pipeline.model.loading import Runtime, decoder_layers, is_quantized

Strategy = Literal["ddp", "fsdp"]


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()  # one process, no torchrun


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


def wrap(
    model: torch.nn.Module, world: World, runtime: Runtime, strategy: Strategy = "ddp"
) -> torch.nn.Module:
    """DDP around the policy scorer, or FSDP2 sharding of it in place, when world.size > 1."""
    if world.size == 1:
        return model
    if strategy == "fsdp":
        # One shard group per decoder layer (the classes HF marks as never to be split), so only
        # one layer's full weights are gathered at a time; the root group takes the embeddings,
        # the final norm and the (possibly tied) LM head.
        for layer in decoder_layers(model.model):
            fully_shard(layer)
        fully_shard(model)
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a module sharded in place by FSDP2's fully_shard."""
    return isinstance(model, FSDPModule)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with full tensors: a collective under FSDP (every rank calls it;
    the unsharded tensors live in CPU memory), else the DDP-unwrapped module's own."""
    if not is_sharded(model):
        return getattr(model, "module", model).state_dict()
    return get_model_state_dict(model, options=_full_on_cpu())


def full_states(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model, optimizer) state dicts with full tensors, for checkpoints (collective under FSDP).
    On a 4-bit base (QLoRA, never sharded), the trainable weights alone (`_adapters_only`)."""
    if _adapters_only(model):
        module = getattr(model, "module", model)
        trainable = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
        return trainable, optimizer.state_dict()
    if not is_sharded(model):
        return full_model_state(model), optimizer.state_dict()
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_full_on_cpu())
    return full_model_state(model), optimizer_state


def _adapters_only(model: torch.nn.Module) -> bool:
    """True for a policy scorer (possibly DDP-wrapped) on a 4-bit base. Its checkpoints hold the
    trainable adapters alone: the frozen base is re-read from models/base (in the run key), and
    load_state_dict refuses the quantisation-state entries its own state_dict writes for them."""
    scorer = getattr(model, "module", model)
    return is_quantized(getattr(scorer, "model", scorer))


def _full_on_cpu() -> Any:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def load_full_states(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Inverse of `full_states`: every rank loads the full state and keeps its shard."""
    if not is_sharded(model):
        module = getattr(model, "module", model)
        if _adapters_only(model):  # every trainable weight, nothing else
            trainable = {n for n, p in module.named_parameters() if p.requires_grad}
            if set(model_state) != trainable:
                raise ValueError("a 4-bit policy's checkpoint must hold its trainable weights")
            module.load_state_dict(model_state, strict=False)
        else:
            module.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def global_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip gradients to `max_norm` (global L2 norm over all ranks' shards); return the norm, a
    0-dim tensor on the device (not read back here: the caller decides when to wait for it)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, reduced over the shards
        norm = norm.full_tensor()
    return norm


def rank_slice(global_micro: np.ndarray, world: World) -> np.ndarray:
    """This rank's share of a global micro-batch (sizes differ by at most one pair)."""
    return np.array_split(global_micro, world.size)[world.rank]


def usable_order(order: np.ndarray, world: World) -> np.ndarray:
    """Drop the last < world pairs of an epoch, so that every rank gets at least one pair."""
    remainder = len(order) % world.size
    return order[: len(order) - remainder] if world.size > 1 and remainder else order


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum of `values` (float64, so sums of many pairs stay exact) over ranks, on
    the device: nothing is read back."""
    if world.size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@contextlib.contextmanager
def no_sync_unless(last: bool, model: torch.nn.Module) -> Iterator[None]:
    """Skip the gradient reduction on accumulation micro-steps; sync on the step's last one."""
    if last:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
