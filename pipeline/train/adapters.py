"""Low-rank adapters (peft LoRA) on the policy, and the reference they make free.

With adapters the base weights never change, so the reference model is the policy itself with its
adapters switched off: exactly the base model, with no second copy in memory and no second load.
That holds for a 4-bit (QLoRA) base too: adapters off, the policy is that same 4-bit base.

peft is imported only where adapters are made or merged: importing it imports bitsandbytes when
that is installed, which costs every stage's start seconds, adapters or not.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from pipeline.model.batches import PairBatch
from pipeline.model.loading import Runtime, is_quantized
from pipeline.model.scoring import CompletionScorer, batch_logps
from pipeline.params import AdapterParams
from pipeline.stage_io import StageError

if TYPE_CHECKING:
    from peft import PeftModel


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model (it can only be one once peft is imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def add_adapters(
    model: PreTrainedModel, lora: AdapterParams, task_type: str = "CAUSAL_LM"
) -> PeftModel:
    """Freeze `model` and put trainable LoRA adapters on the modules lora.target_modules names.
    For a reward model (task_type "SEQ_CLS") peft also keeps its new scalar head trainable.

    On a 4-bit base, peft's k-bit preparation first: every weight frozen, any fp16/bf16 one left
    unquantised (norms, embeddings) upcast to fp32, so the adapters (fp32, like the master
    weights elsewhere) train in full precision on top of the 4-bit linears."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        # Activation checkpointing is the trainer's own (train.gradient_checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    names = [name.strip() for name in lora.target_modules.split(",") if name.strip()]
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # "all-linear": peft finds every linear layer but the output head, whatever the family
        # calls them (Phi-3's fused qkv_proj, GPT-2's c_attn).
        target_modules="all-linear" if names == ["all-linear"] else names,
        bias="none",
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # peft's NoMatchingPeftModuleError
        raise StageError(
            f"lora.target_modules: {lora.target_modules} names no module of "
            f"{type(model).__name__}; name its own linear layers, or use all-linear ({error})"
        ) from None


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class AdaptersOffReference:
    """Reference log-probs: the policy's own forward with its adapters disabled, under no_grad.

    `scorer` is the unwrapped policy scorer (not its DDP wrapper: no gradient, no collective).
    Under FSDP the scorer is sharded in place, so this forward gathers the shards like the
    policy's: every rank calls it for its slice of each micro-batch, as the loop does.
    """

    def __init__(self, scorer: CompletionScorer, runtime: Runtime) -> None:
        if not has_adapters(scorer.model):
            raise TypeError("AdaptersOffReference needs a policy with LoRA adapters")
        self.scorer, self.runtime = scorer, runtime

    def __call__(self, batch: PairBatch, rows: np.ndarray) -> torch.Tensor:
        with torch.no_grad(), self.scorer.model.disable_adapter():
            return batch_logps(self.scorer, batch, self.runtime)


def dequantized_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The 4-bit base's linear weights as training saw them: dequantised to the bf16 compute
    dtype (bitsandbytes runs every 4-bit matmul on these values), held in fp32 on the CPU and
    keyed like the plain HF model's state dict."""
    import bitsandbytes as bnb  # only ever called for a 4-bit model: the package is there

    weights = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            values = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            key = name.removesuffix(".base_layer") + ".weight"  # peft's wrapper keeps the base
            weights[key] = values.to(torch.bfloat16).float().cpu()
    return weights


def merge_onto_base(
    adapter_dir: Path,
    base_dir: Path,
    trust_remote_code: bool,
    base_weights: dict[str, torch.Tensor] | None = None,
) -> PreTrainedModel:
    """A plain (unquantised, unsharded) model: the base at `base_dir` loaded afresh in fp32 on
    the CPU, `base_weights` put in place of its own (the dequantised 4-bit weights of a QLoRA
    run), then the saved adapter merged into it. For a policy that cannot merge in place: a
    4-bit one (peft would re-quantise the merged weights, losing most of the adapters' update)
    or one sharded by FSDP (whose frozen base equals `base_dir`'s weights)."""
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if base_weights:
        unexpected = base.load_state_dict(base_weights, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"dequantised weights the base does not have: {unexpected[:3]}")
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
