"""The trained policy as a Hugging Face folder: in the base model's dtype, adapters merged.

A leaf of the train recipe: it only writes what the recipe hands it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.model.loading import is_quantized
from pipeline.model.scoring import CompletionScorer
from pipeline.train import distributed
from pipeline.train.adapters import dequantized_weights, has_adapters, merge_onto_base

if TYPE_CHECKING:
    from peft import PeftModel


def base_dtype(model_dir: Path, trust_remote_code: bool) -> torch.dtype:
    """The dtype the base model ships in (bf16 for Qwen3); fp32 when its config names none."""
    dtype = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def policy_state(scorer: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trained weights to save, keyed like the HF model: gathered from the FSDP shards (a
    collective: every rank calls it), or None when the model inside `scorer` holds them itself."""
    if not distributed.is_sharded(scorer):
        return None
    full = distributed.full_model_state(scorer)  # keys of the CompletionScorer: `model.` + HF key
    return {k.removeprefix("model."): v for k, v in full.items()}


def save_policy(
    folder: Path,
    scorer: CompletionScorer,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
    base_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Write the trained policy as a HF folder in `dtype` (the base model's), not in the fp32 of
    the master weights: half the disk for a bf16 model in models/policy, the DVC cache and every
    MLflow version. `state` is the gathered FSDP state, None when the model holds its weights.
    With adapters, `adapter/` holds them alone; `base_dir` is needed when they cannot merge in
    place (`merged_policy`)."""
    model = scorer.model
    if has_adapters(model):  # the adapter alone, then the merged model for serving
        adapter_dir = folder / "adapter"
        model, state = merged_policy(model, state, adapter_dir, base_dir, trust_remote_code), None
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
    base_dir: Path | None,
    trust_remote_code: bool,
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
    if base_dir is None:
        raise ValueError("merging a sharded or 4-bit policy needs the base model's folder")
    weights = dequantized_weights(model) if quantized else None
    return merge_onto_base(adapter_dir, base_dir, trust_remote_code, weights)


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
