"""Resumable training checkpoints: weights, optimizer, scheduler, RNG, data position, log so far.

Each checkpoint is a folder written under a temporary name and renamed into place; only the
newest is kept. A checkpoint carries a fingerprint of what produced it (train and loss params,
base model, train data), and one with another fingerprint is never resumed: resuming an lr=1e-5
run from an lr=1e-6 checkpoint would be silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.fingerprint import fingerprint
from pipeline.params import LossParams, TrainParams
from pipeline.stage_io import atomic_dir, write_json_atomic

PREFIX = "step-"


# Settings that do not change the maths; a checkpoint stays resumable when only these change.
# (nproc does: batch_size is per process, so it sets the global batch.)
NOT_IN_FINGERPRINT = (
    "log_every",
    "save_every",
    "parallel",
    "max_tokens_per_micro_batch",
    "gradient_checkpointing",
    "pad_to_multiple_of",
    "compile",
)


def run_key(train: TrainParams, loss: LossParams, model_dir: Path, train_split: Path) -> str:
    """Fingerprint of everything that decides the trained weights: a checkpoint is resumed only
    under the same key. Checkpoints hold full states, so a DDP run may resume under FSDP and the
    other way round (`parallel` is not in the key)."""
    config = {k: v for k, v in dataclasses.asdict(train).items() if k not in NOT_IN_FINGERPRINT}
    return fingerprint({**config, "loss": dataclasses.asdict(loss)}, model_dir, train_split)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a run keeps its checkpoints: the folder, the fingerprint (`run_key`) a checkpoint
    must carry to be resumed, and the MLflow run a resumed run continues (None: no run)."""

    folder: Path
    key: str
    run_id: str | None = None


def save(
    slot: Slot,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    position: dict[str, Any],
    log_rows: list[dict[str, float]],
) -> Path:
    """Write checkpoint `slot.folder/step-N` atomically, then remove older ones.

    The states are full (unsharded) ones, `distributed.full_states`: resumable by any world size.
    `position` is where in the data the run is (its "step" names the folder).
    """
    folder = slot.folder
    target = folder / f"{PREFIX}{position['step']:08d}"
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
                "fingerprint": slot.key,
                "log": log_rows,
                "run_id": slot.run_id,
                "aliases": aliases,
                "position": position,
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


def resumable_run_id(folder: Path, key: str) -> str | None:
    """The MLflow run the checkpoint a run with fingerprint `key` would resume from names."""
    found = latest(folder, key)
    return json.loads((found / "meta.json").read_text())["run_id"] if found is not None else None


def restore(path: Path, scheduler: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Read a checkpoint -> (model state, optimizer state, meta). The scheduler and RNG states are
    set here; the model and optimizer states (full tensors on the CPU, tied names restored) are for
    `distributed.load_full_states`, which knows how they are sharded; meta holds "position" and
    "log" as `save` got them."""
    model_state = load_file(str(path / "model.safetensors"), device="cpu")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    meta = json.loads((path / "meta.json").read_text())
    for name, saved in meta["aliases"].items():
        model_state[name] = model_state[saved]
    return model_state, state["optimizer"], meta


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
