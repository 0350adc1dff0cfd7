"""Resumable training checkpoints: weights, optimizer, scheduler, RNG, data position, log so far.

Each checkpoint is a folder written under a temporary name and renamed into place; only the
newest is kept. A checkpoint carries a fingerprint of what produced it (train params, base model,
train data), and one with another fingerprint is never resumed: DVC keeps the folder between
experiments, and resuming an lr=1e-5 run from an lr=1e-6 checkpoint would be silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.stage_io import atomic_dir, write_json_atomic

PREFIX = "step-"


@dataclasses.dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next step belongs to
    step_in_epoch: int = 0  # optimizer steps of that epoch already done
    epoch_loss_sum: float = 0.0  # sum of per-pair losses so far in this epoch
    epoch_pairs: int = 0  # pairs seen so far in this epoch
    epoch_losses: list[float] = dataclasses.field(default_factory=list)  # finished epochs' means


def save(
    folder: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    position: Progress,
    log_rows: list[dict[str, float]],
    key: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `folder/step-N` atomically, then remove older ones.

    The states are full (unsharded) ones, `distributed.full_states`: resumable by any world size.
    """
    target = folder / f"{PREFIX}{position.step:08d}"
    tensors, aliases = _untie(model_state)
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
            },
            tmp / "state.pt",
        )
        write_json_atomic(
            tmp / "meta.json",
            {
                "fingerprint": key,
                "log": log_rows,
                "extra": extra or {},
                "aliases": aliases,
                **dataclasses.asdict(position),
            },
        )
    for old in folder.glob(f"{PREFIX}*"):
        if old != target and old.is_dir():
            shutil.rmtree(old)
    return target


def _untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors sharing storage (tied embeddings) saved once: safetensors refuses aliases.

    Returns (tensors to save, {dropped name: the saved name it aliases}).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if identity in seen:
            aliases[name] = seen[identity]
        else:
            seen[identity] = name
            tensors[name] = tensor.contiguous()
    return tensors, aliases


def latest(folder: Path, key: str) -> Path | None:
    """The newest complete checkpoint made with fingerprint `key`, if any."""
    found = sorted(folder.glob(f"{PREFIX}*")) if folder.is_dir() else []
    for path in reversed(found):
        meta = path / "meta.json"
        if meta.is_file() and json.loads(meta.read_text())["fingerprint"] == key:
            return path
    return None


def read_extra(path: Path) -> dict[str, Any]:
    """What the caller stored with the checkpoint (e.g. the MLflow run id to continue)."""
    return json.loads((path / "meta.json").read_text()).get("extra", {})


def resumable_extra(folder: Path, key: str) -> dict[str, Any]:
    """What the checkpoint a run with fingerprint `key` would resume from stored; {} if none."""
    found = latest(folder, key)
    return read_extra(found) if found is not None else {}


@dataclasses.dataclass
class Restored:
    model_state: dict[str, torch.Tensor]  # full tensors on the CPU, tied names restored
    optimizer_state: dict[str, Any]
    progress: Progress
    log: list[dict[str, float]]


def restore(path: Path, scheduler: Any) -> Restored:
    """Read a checkpoint: the scheduler and RNG states are set here; the model and optimizer
    states are returned for `distributed.load_full_states` (which knows how they are sharded)."""
    model_state = load_file(str(path / "model.safetensors"), device="cpu")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    meta = json.loads((path / "meta.json").read_text())
    for name, saved in meta.get("aliases", {}).items():
        model_state[name] = model_state[saved]
    fields = {f.name for f in dataclasses.fields(Progress)}
    progress = Progress(**{k: v for k, v in meta.items() if k in fields})
    return Restored(model_state, state["optimizer"], progress, meta["log"])


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
