"""Reference log-probs: computed on the fly by the frozen model, or read from the reference stage.

The reference model never changes during DPO, so its completion log-probs for every pair can be
computed once (the `reference` stage) and stored beside the shards. Training then holds no second
model and runs no second forward. A cache is only valid for the exact base model, tokenized data
and numeric setting (device type, autocast dtype, a 4-bit base) it was computed with; its
fingerprint records them and a mismatch is an error, never a silent fallback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.fingerprint import fingerprint
from pipeline.model.batches import PairBatch, to_device
from pipeline.model.loading import Quantize, Runtime, assert_frozen, attention_implementation
from pipeline.model.scoring import batch_logps
from pipeline.stage_io import StageError, write_json_atomic

FINGERPRINT_FILE = "fingerprint.json"
LOGPS_FILE = "logps.npy"  # (N, 2) float32: chosen, rejected; row i is pair i of the split


class StaleReference(StageError, ValueError):
    """Cached reference log-probs made from other inputs or another numeric setting."""


class ReferenceScores(Protocol):
    def __call__(self, batch: PairBatch, rows: np.ndarray) -> torch.Tensor:
        """(2B,) reference log-probs of `batch`, whose pairs are rows `rows` of the split."""
        ...


class ModelReference:
    """On the fly: a frozen model's forward under no_grad."""

    def __init__(self, model: torch.nn.Module, runtime: Runtime) -> None:
        assert_frozen(model)
        self.model, self.runtime = model, runtime

    def __call__(self, batch: PairBatch, rows: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return batch_logps(self.model, batch, self.runtime)


class CachedReference:
    """Precomputed: a lookup into the reference stage's (N, 2) table."""

    def __init__(self, logps: np.ndarray, device: torch.device) -> None:
        self.logps = torch.from_numpy(np.ascontiguousarray(logps, dtype=np.float32)).to(device)

    def __call__(self, batch: PairBatch, rows: np.ndarray) -> torch.Tensor:
        index = to_device(torch.from_numpy(np.ascontiguousarray(rows)), self.logps.device)
        picked = self.logps[index]
        return torch.cat([picked[:, 0], picked[:, 1]])  # [chosen; rejected], like the batch


def describe(
    model_dir: Path, split_dir: Path, runtime: Runtime, quantize: Quantize
) -> dict[str, Any]:
    """What a cache must match: inputs' content hash and the numeric setting.

    `quantize` is train.lora.quantize: the reference must be the base the policy trains on, so a
    4-bit (nf4) policy needs log-probs of the same 4-bit base. The full-precision base's differ
    by the quantisation error, which would enter every implicit reward as an offset the
    adapters learn to undo instead of the preferences, and step 1 would no longer be ln 2.
    """
    return {
        "inputs": fingerprint({}, model_dir, split_dir),
        "device": runtime.device.type,
        "autocast": str(runtime.autocast_dtype),
        "attention": attention_implementation(runtime),  # flash-attention also means packing
        "quantize": quantize,
    }


def save(folder: Path, logps: np.ndarray, identity: dict[str, Any]) -> None:
    """Write one split's table and its fingerprint (inside an atomic_dir of the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / LOGPS_FILE, logps.astype(np.float32))
    write_json_atomic(folder / FINGERPRINT_FILE, identity)


def load(folder: Path, identity: dict[str, Any], n_pairs: int) -> np.ndarray:
    """The cached (N, 2) table, after checking it was made from exactly these inputs."""
    path = folder / FINGERPRINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no cached reference log-probs; run the reference stage")
    stored = json.loads(path.read_text())
    for key, value in identity.items():
        if stored.get(key) != value:
            raise StaleReference(
                f"{folder}: cached reference log-probs do not match ({key}: cached "
                f"{stored.get(key)!r}, now {value!r}); re-run the reference stage or set "
                "train.cached_reference: false"
            )
    logps = np.load(folder / LOGPS_FILE)
    if logps.shape != (n_pairs, 2):
        raise StaleReference(f"{folder}: {logps.shape[0]} cached pairs, the split has {n_pairs}")
    return logps
