"""One optimizer step of DPO: forward over `[chosen; rejected]`, loss, backward, clip, update.

Per micro-batch: the policy's completion log-probs, the reference's (the reference stage's cache,
a no-grad forward of the frozen reference, or zeros when reference-free), the configured loss
variant (`pipeline.objective.losses`) summed over pairs and divided by the pairs of the whole
step, so accumulation gives the same gradient as one large batch; then clip, step, schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from pipeline.model.loading import Runtime
from pipeline.model.reference import ReferenceScores
from pipeline.model.scoring import PairBatch, batch_logps, collate_pairs
from pipeline.objective.losses import PairLogps, compute_loss
from pipeline.objective.metrics import STEP_METRIC_KEYS, completion_token_counts, step_metrics
from pipeline.params import TrainParams
from pipeline.stage_io import StageError
from pipeline.train.checkpoint import Progress
from pipeline.train.distributed import (
    World,
    all_reduce_sum,
    current_world,
    global_grad_norm,
    no_sync_unless,
    rank_slice,
)
from pipeline.train.plan import forward_parts, total_steps


class NonFiniteLoss(StageError, FloatingPointError):
    """Raised when a loss or gradient norm is NaN/inf; the last good checkpoint is kept."""


class OutOfMemory(StageError, RuntimeError):
    """The accelerator ran out of memory in a step; the message names the settings to lower."""


@dataclasses.dataclass
class TrainContext:
    params: TrainParams
    runtime: Runtime
    pad_token_id: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    progress: Progress
    log: list[dict[str, float]]
    world: World
    lengths: np.ndarray  # (N, 2) prompt + answer tokens of every pair (plan.pair_lengths)


def make_context(
    policy: torch.nn.Module,
    params: TrainParams,
    runtime: Runtime,
    pad_token_id: int,
    lengths: np.ndarray,
) -> TrainContext:
    world = current_world()
    # The fused kernel updates every parameter in a few launches instead of several per tensor.
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],  # all, or the adapters alone (LoRA)
        lr=params.lr,
        weight_decay=params.weight_decay,
        fused=True if runtime.device.type == "cuda" else None,
    )
    steps = total_steps(params, len(lengths), world)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(params.warmup_ratio * steps), steps)
    return TrainContext(
        params, runtime, pad_token_id, optimizer, scheduler, Progress(), [], world, lengths
    )


def pair_forward(
    policy: torch.nn.Module,
    reference: ReferenceScores | None,
    batch: PairBatch,
    rows: np.ndarray,
    runtime: Runtime,
    params: TrainParams,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair losses (B,) of the configured variant, with grad, and the batch's metric means.

    `reference=None` is reference-free training: reference log-probs are 0.
    """
    policy_logps = batch_logps(policy, batch, runtime)
    reference_logps = None if reference is None else reference(batch, rows)
    tokens = completion_token_counts(batch.completion_mask)
    logps = PairLogps.from_concatenated(policy_logps, reference_logps, tokens, batch.n_pairs)
    out = compute_loss(params.loss, logps, params.beta, **params.loss_settings())
    metrics = step_metrics(
        out.losses.detach(),
        out.chosen_rewards,
        out.rejected_rewards,
        logps.policy_chosen.detach(),
        logps.policy_rejected.detach(),
        out.nll,
    )
    return out.losses, metrics


def optimizer_step(
    policy: torch.nn.Module,
    reference: ReferenceScores | None,
    dataset: Any,
    micro_batches: list[Any],
    ctx: TrainContext,
) -> tuple[dict[str, float], float, int, int]:
    """One optimizer step over its micro-batches -> (metric means, grad norm, pairs, tokens).

    `micro_batches` are global (all ranks); each runs as one forward, or as several when it holds
    more than `max_tokens_per_micro_batch` padded tokens (`plan.forward_parts`), and this rank
    runs its slice of each forward. The loss is the sum
    of per-pair losses over the whole step divided by its pairs; DDP averages gradients over
    ranks, hence the factor world.size.
    """
    step_pairs = sum(len(m) for m in micro_batches)
    budget = ctx.params.max_tokens_per_micro_batch
    parts = [
        part
        for global_micro in micro_batches
        for part in forward_parts(global_micro, ctx.lengths, ctx.world, budget)
    ]
    sums = dict.fromkeys(STEP_METRIC_KEYS, 0.0)
    tokens = 0
    for i, part in enumerate(parts):
        indices = rank_slice(part, ctx.world)
        batch = collate_pairs(dataset[indices.tolist()], ctx.pad_token_id).to(ctx.runtime.device)
        losses, metrics = pair_forward(policy, reference, batch, indices, ctx.runtime, ctx.params)
        loss = losses.sum() * ctx.world.size / step_pairs
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite DPO loss at step {ctx.progress.step + 1}: {loss}")
        with no_sync_unless(i == len(parts) - 1, policy):  # gradients reduced once per step
            loss.backward()
        for key, value in metrics.items():
            sums[key] += value * batch.n_pairs
        tokens += batch.real_tokens
    *totals, tokens = all_reduce_sum([*sums.values(), tokens], ctx.runtime.device, ctx.world)
    sums = dict(zip(sums, totals, strict=True))
    grad_norm = global_grad_norm(policy, ctx.params.max_grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteLoss(f"non-finite gradient norm at step {ctx.progress.step + 1}")
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return {k: v / step_pairs for k, v in sums.items()}, grad_norm, step_pairs, int(tokens)
