"""What the train stage needs around the loop: the run key, the reference source, the outputs.

Kept out of the loop so that `train_policy` reads top to bottom and the stage script only reads
params, calls these and writes files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.fingerprint import fingerprint
from pipeline.model import reference
from pipeline.model.loading import (
    Runtime,
    check_quantize,
    enable_activation_checkpointing,
    freeze,
    is_quantized,
)
from pipeline.model.reference import ReferenceScores
from pipeline.model.scoring import CompletionScorer, load_scorer
from pipeline.params import Params, TrainParams
from pipeline.stage_io import DATA_REFERENCE, DATA_TOKENIZED, MODEL_BASE
from pipeline.train import distributed
from pipeline.train.adapters import (
    AdaptersOffReference,
    add_adapters,
    dequantized_weights,
    merge_onto_base,
)
from pipeline.train.loop import TrainResult

# Settings that do not change the maths; a checkpoint stays resumable when only these change.
# (nproc does: batch_size is per process, so it sets the global batch.)
NOT_IN_FINGERPRINT = (
    "log_every",
    "save_every",
    "parallel",
    "max_tokens_per_micro_batch",
    "gradient_checkpointing",
)


def run_key(train: TrainParams, model_dir: Path, train_split: Path) -> str:
    """Fingerprint of everything that decides the trained weights: a checkpoint is resumed only
    under the same key. Checkpoints hold full states, so a DDP run may resume under FSDP and the
    other way round (`parallel` is not in the key)."""
    config = {k: v for k, v in dataclasses.asdict(train).items() if k not in NOT_IN_FINGERPRINT}
    return fingerprint(config, model_dir, train_split)


def reference_scores(
    params: Params, runtime: Runtime, n_pairs: int, policy: CompletionScorer
) -> ReferenceScores | None:
    """The reference stage's cache (checked against base model, data and runtime); when
    train.cached_reference is false, the policy with its adapters off (LoRA) or a frozen copy of
    the base model; None when reference-free."""
    if params.train.reference_free:
        return None
    if params.train.cached_reference:
        quantize = params.train.lora.quantize  # a 4-bit policy needs the 4-bit base's log-probs
        identity = reference.describe(MODEL_BASE, DATA_TOKENIZED / "train", runtime, quantize)
        logps = reference.load(DATA_REFERENCE / "train", identity, n_pairs)
        return reference.CachedReference(logps, runtime.device)
    if params.train.lora.enabled:
        return AdaptersOffReference(policy, runtime)
    model = load_scorer(MODEL_BASE, runtime, params.model.trust_remote_code)
    return reference.ModelReference(freeze(model), runtime)


def load_policy(params: Params, runtime: Runtime) -> CompletionScorer:
    """The base model as the trainable policy scorer (fp32 master weights, or a 4-bit base under
    fp32 adapters with train.lora.quantize: nf4), with activation checkpointing when
    train.gradient_checkpointing is on."""
    lora = params.train.lora
    check_quantize(lora.quantize, runtime, "train.device")
    scorer = load_scorer(MODEL_BASE, runtime, params.model.trust_remote_code, lora.quantize)
    if params.train.gradient_checkpointing:
        enable_activation_checkpointing(scorer.model)
    if lora.enabled:
        scorer.model = add_adapters(scorer.model, lora)
    return scorer


def base_dtype(model_dir: Path, trust_remote_code: bool) -> torch.dtype:
    """The dtype the base model ships in (bf16 for Qwen3); fp32 when its config names none."""
    dtype = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


class BaseFolder(NamedTuple):
    """Where a merge that cannot happen in place loads the frozen base from afresh."""

    folder: Path
    trust_remote_code: bool


def save_policy(
    folder: Path,
    scorer: CompletionScorer,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
    base: BaseFolder | None = None,
) -> None:
    """Write the trained policy as a HF folder in `dtype` (the base model's), not in the fp32 of
    the master weights: half the disk for a bf16 model in models/policy, the DVC cache and every
    MLflow version. `state` is the gathered FSDP state, None when the model holds its weights.
    With adapters, `adapter/` holds them alone; `base` is needed when they cannot merge in place
    (`merged_policy`)."""
    model = scorer.model
    if isinstance(model, PeftModel):  # the adapter alone, then the merged model for serving
        model, state = merged_policy(model, state, folder / "adapter", base), None
    if dtype != torch.float32:
        state = _cast(model.state_dict() if state is None else state, dtype)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    if dtype != torch.float32:  # save_pretrained writes the dtype of the (fp32) module
        config = AutoConfig.from_pretrained(folder)
        config.dtype = dtype
        config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def merged_policy(
    model: PeftModel,
    state: dict[str, torch.Tensor] | None,
    adapter_dir: Path,
    base: BaseFolder | None,
) -> PreTrainedModel:
    """Save the adapter to `adapter_dir` (from `state`, the gathered weights, when sharded) and
    return the plain merged model. In place when the policy holds its full-precision weights;
    sharded (FSDP) or on a 4-bit base, onto a fresh load of the base instead, for nf4 with the
    base's dequantised bf16 weights: the merged model is what was trained, not the original
    base plus the adapters."""
    model.save_pretrained(adapter_dir, safe_serialization=True, state_dict=state)
    quantized = is_quantized(model)
    if state is None and not quantized:
        return model.merge_and_unload()
    if base is None:
        raise ValueError("merging a sharded or 4-bit policy needs the base model's folder")
    weights = dequantized_weights(model) if quantized else None
    return merge_onto_base(adapter_dir, base.folder, base.trust_remote_code, weights)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype`; tensors sharing storage (tied embeddings) stay shared."""
    cast: dict[tuple[int, int], torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in cast:
            cast[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        out[name] = cast[key]
    return out


def policy_state(scorer: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trained weights to save, keyed like the HF model: gathered from the FSDP shards (a
    collective: every rank calls it), or None when the model inside `scorer` holds them itself."""
    if not distributed.is_sharded(scorer):
        return None
    full = distributed.full_model_state(scorer)  # keys of the CompletionScorer: `model.` + HF key
    return {k.removeprefix("model."): v for k, v in full.items()}


# What metrics/train.json holds, for `dvc exp show`; the whole summary goes to
# reports/train.json and MLflow.
HEADLINE = ("final_loss", "epoch_losses", "steps", "pairs_per_s", "padded_share")


def summary(result: TrainResult) -> dict[str, Any]:
    """reports/train.json: the run's figures (per-step rows go to plots/train.csv)."""
    return {
        "steps": result.steps,
        "final_loss": result.log[-1]["loss"],
        "epoch_losses": result.epoch_losses,
        "train_seconds": round(result.train_seconds, 2),
        "pairs_per_s": round(result.pairs_per_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        **result.padding,
    }
