"""The learning rate over a run: linear warmup, then linear decay to zero. Used by the DPO
recipe and by the judge's reward-model training."""

from __future__ import annotations

import torch


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr factor per step: 0 -> 1 linearly over `warmup` steps, then 1 -> 0 linearly at
    `total` (the schedule of transformers' get_linear_schedule_with_warmup, step for step: a
    test compares them). Importing that function imports the Trainer's modules, and with them
    peft and bitsandbytes when installed: seconds of every stage's start."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
