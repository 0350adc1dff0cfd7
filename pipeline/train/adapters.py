"""Low-rank adapters (peft LoRA) on the policy, and the reference they make free.

With adapters the base weights never change, so the reference model is the policy itself with its
adapters switched off: exactly the base model, with no second copy in memory and no second load.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from pipeline.model.loading import Runtime
from pipeline.model.scoring import CompletionScorer, PairBatch, batch_logps
from pipeline.params import LoraParams


def add_adapters(model: PreTrainedModel, lora: LoraParams) -> PeftModel:
    """Freeze `model` and put trainable LoRA adapters on the modules lora.target_modules names."""
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=[name.strip() for name in lora.target_modules.split(",") if name.strip()],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class AdaptersOffReference:
    """Reference log-probs: the policy's own forward with its adapters disabled, under no_grad.

    `scorer` is the unwrapped policy scorer (not its DDP wrapper: no gradient, no collective).
    """

    def __init__(self, scorer: CompletionScorer, runtime: Runtime) -> None:
        if not isinstance(scorer.model, PeftModel):
            raise TypeError("AdaptersOffReference needs a policy with LoRA adapters")
        self.scorer, self.runtime = scorer, runtime

    def __call__(self, batch: PairBatch, rows: np.ndarray) -> torch.Tensor:
        with torch.no_grad(), self.scorer.model.disable_adapter():
            return batch_logps(self.scorer, batch, self.runtime)
