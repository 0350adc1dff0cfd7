"""The reference stage's computation: each tokenized split's completion log-probs by the frozen
base model, stored with the fingerprint of what they were computed from (`reference.save`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.schema import load_tokenized
from pipeline.model.loading import Runtime, check_quantize, freeze, resolve_runtime
from pipeline.model.reference import describe, save
from pipeline.model.scoring import load_scorer, score_pairs
from pipeline.params import Params
from pipeline.stage_io import DATA_TOKENIZED, MODEL_BASE


def check_devices(params: Params) -> None:
    """Refuse a 4-bit base off CUDA for either split before any work (QLoRA needs a GPU)."""
    if params.train.lora.quantize == "none":
        return
    for key, device in (("train.device", params.train.device), ("eval.device", params.eval.device)):
        check_quantize(params.train.lora.quantize, resolve_runtime(device), key)


def score_split(params: Params, split: str, runtime: Runtime, pad: int, out: Path) -> None:
    """One tokenized split's reference log-probs, by the frozen base model, and their
    fingerprint, into `out / split`."""
    quantize = params.train.lora.quantize
    model = freeze(load_scorer(MODEL_BASE, runtime, params.model.trust_remote_code, quantize))
    dataset = load_tokenized(DATA_TOKENIZED / split)
    chosen, rejected = score_pairs(
        model, dataset, params.reference.batch_size, runtime, pad, f"reference {split}"
    )
    identity = describe(MODEL_BASE, DATA_TOKENIZED / split, runtime, quantize)
    save(out / split, np.stack([chosen, rejected], axis=1), identity)
    print(f"{split}: reference log-probs of {len(dataset)} pairs on {runtime.device}")
