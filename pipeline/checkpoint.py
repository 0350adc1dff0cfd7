"""Resumable training checkpoints: weights, optimizer, scheduler, RNG, data position, log so far.

Each checkpoint is a folder written under a temporary name and renamed into place; only the
newest is kept. A checkpoint carries a fingerprint of what produced it (train params, base model,
train data), and one with another fingerprint is never resumed: DVC keeps the folder between
experiments, and resuming an lr=1e-5 run from an lr=1e-6 checkpoint would be silently wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from pipeline.atomic import atomic_dir, write_json_atomic

PREFIX = "step-"


@dataclasses.dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next step belongs to
    step_in_epoch: int = 0  # optimizer steps of that epoch already done
    epoch_loss_sum: float = 0.0  # sum of per-pair losses so far in this epoch
    epoch_pairs: int = 0  # pairs seen so far in this epoch
    epoch_losses: list[float] = dataclasses.field(default_factory=list)  # finished epochs' means


def fingerprint(config: dict[str, Any], *folders: Path) -> str:
    """sha256 over a config dict and the bytes of every file in `folders`."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 23):
                    digest.update(chunk)
    return digest.hexdigest()


def save(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: Progress,
    log_rows: list[dict[str, float]],
    key: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `folder/step-N` atomically, then remove older ones."""
    model = getattr(model, "module", model)  # DDP: save the replica, resumable by any world size
    target = folder / f"{PREFIX}{position.step:08d}"
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
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
                **dataclasses.asdict(position),
            },
        )
    for old in folder.glob(f"{PREFIX}*"):
        if old != target and old.is_dir():
            shutil.rmtree(old)
    return target


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


def restore(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[Progress, list[dict[str, float]]]:
    """Load a checkpoint into the given objects; return the data position and the log so far."""
    model = getattr(model, "module", model)
    load_model(model, str(path / "model.safetensors"), device=str(_device_of(model)))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    meta = json.loads((path / "meta.json").read_text())
    fields = {f.name for f in dataclasses.fields(Progress)}
    return Progress(**{k: v for k, v in meta.items() if k in fields}), meta["log"]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
