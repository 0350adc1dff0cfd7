"""The DPO training loop: AdamW, linear warmup/decay, accumulation, clipping, resumable.

Per optimizer step: for each micro-batch, one forward of the policy over `[chosen; rejected]`,
the reference log-probs (the reference stage's cache, a no-grad forward of the frozen reference,
or zeros when reference-free), the configured loss variant (`pipeline.losses`) summed over pairs
and divided by the pairs of the whole step (so accumulation gives the same gradient as one large
batch), backward; then clip, step, schedule. Metrics are averaged over the pairs of each logging
window.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from pipeline import checkpoint
from pipeline.batching import (
    PairBatch,
    collate_pairs,
    epoch_order,
    length_grouped_order,
    optimizer_steps,
    padded_share,
    pair_lengths,
)
from pipeline.checkpoint import Progress
from pipeline.distributed import (
    World,
    all_reduce_sum,
    barrier,
    current_world,
    full_states,
    global_grad_norm,
    load_full_states,
    no_sync_unless,
    rank_slice,
    usable_order,
)
from pipeline.dpo import STEP_METRIC_KEYS, completion_token_counts, step_metrics
from pipeline.losses import PairLogps, compute_loss
from pipeline.modeling import Runtime, assert_frozen, batch_logps
from pipeline.params import TrainParams
from pipeline.progress import bar
from pipeline.reference import ModelReference, ReferenceScores

# Every row of plots/train.csv (and of the MLflow step metrics) has exactly these keys.
LOG_KEYS = ("step", "epoch", *STEP_METRIC_KEYS, "grad_norm", "lr", "tokens/s", "pairs/s")
SINGLE = World()  # one process, no torchrun
LogCallback = Callable[[dict[str, float]], None]


class NonFiniteLoss(FloatingPointError):
    """Raised when a loss or gradient norm is NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    steps: int
    log: list[dict[str, float]]
    epoch_losses: list[float]
    train_seconds: float  # wall time of the steps run by this process (not a resumed prefix)
    pairs_per_s: float
    tokens_per_s: float
    padding: dict[str, Any]  # padded-token share per epoch, configured vs random batching


@dataclasses.dataclass
class Window:
    """Sums over the steps since the last log row."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    pairs: int = 0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(
        self, metrics: dict[str, float], pairs: int, grad_norm: float, tokens: int, seconds: float
    ) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * pairs
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm
        self.pairs, self.steps = self.pairs + pairs, self.steps + 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    def row(self, step: int, epoch: float, lr: float) -> dict[str, float]:
        row: dict[str, float] = {"step": step, "epoch": epoch}
        row.update({k: self.sums[k] / self.pairs for k in STEP_METRIC_KEYS})
        row["grad_norm"] = self.sums["grad_norm"] / self.steps
        row["lr"] = lr
        row["tokens/s"] = self.tokens / self.seconds
        row["pairs/s"] = self.pairs / self.seconds
        return row


def epoch_plan(lengths: Any, params: TrainParams, epoch: int, world: World = SINGLE) -> Any:
    """The epoch's pair order: length-grouped or plain random, both a function of (seed, epoch).

    Groups are cut at the global micro-batch (batch_size pairs on each of `world.size` ranks).
    """
    size = params.batch_size * world.size
    if params.length_grouping:
        order = length_grouped_order(lengths, size, params.seed, epoch)
    else:
        order = epoch_order(len(lengths), params.seed, epoch)
    return usable_order(order, world)


def padding_report(lengths: Any, params: TrainParams) -> dict[str, Any]:
    """Padded-token share of every epoch's micro-batches, configured vs plain random batching.

    (With packed batches on CUDA + flash-attention no padding is computed at all; this is the
    share the padded path would carry.)
    """
    configured = [
        padded_share(lengths, epoch_plan(lengths, params, e), params.batch_size)
        for e in range(params.epochs)
    ]
    random = [
        padded_share(lengths, epoch_order(len(lengths), params.seed, e), params.batch_size)
        for e in range(params.epochs)
    ]
    return {
        "padded_share": float(np.mean(configured)),
        "padded_share_random": float(np.mean(random)),
        "padded_share_per_epoch": [round(v, 4) for v in configured],
    }


def total_steps(params: TrainParams, n_pairs: int, world: World = SINGLE) -> int:
    n_pairs = len(usable_order(np.arange(n_pairs), world))
    micro_batches = math.ceil(n_pairs / (params.batch_size * world.size))
    per_epoch = math.ceil(micro_batches / params.grad_accum)
    planned = per_epoch * params.epochs
    return min(planned, params.max_steps) if params.max_steps else planned


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

    `micro_batches` are global (all ranks); this rank runs its slice of each. The loss is the sum
    of per-pair losses over the whole step divided by its pairs; DDP averages gradients over
    ranks, hence the factor world.size.
    """
    step_pairs = sum(len(m) for m in micro_batches)
    sums = dict.fromkeys(STEP_METRIC_KEYS, 0.0)
    tokens = 0
    for i, global_micro in enumerate(micro_batches):
        indices = rank_slice(global_micro, ctx.world)
        batch = collate_pairs(dataset[indices.tolist()], ctx.pad_token_id).to(ctx.runtime.device)
        losses, metrics = pair_forward(policy, reference, batch, indices, ctx.runtime, ctx.params)
        loss = losses.sum() * ctx.world.size / step_pairs
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite DPO loss at step {ctx.progress.step + 1}: {loss}")
        with no_sync_unless(i == len(micro_batches) - 1, policy):
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


def make_context(
    policy: torch.nn.Module, params: TrainParams, runtime: Runtime, pad_token_id: int, n_pairs: int
) -> TrainContext:
    world = current_world()
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=params.lr, weight_decay=params.weight_decay
    )
    steps = total_steps(params, n_pairs, world)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(params.warmup_ratio * steps), steps)
    return TrainContext(params, runtime, pad_token_id, optimizer, scheduler, Progress(), [], world)


def train_policy(
    policy: torch.nn.Module,
    reference: ReferenceScores | None,
    dataset: Any,
    params: TrainParams,
    runtime: Runtime,
    pad_token_id: int,
    checkpoint_dir: Path,
    run_key: str,
    on_log: LogCallback | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `policy` in place on the tokenized `dataset`, resuming from `checkpoint_dir`.

    `run_key` fingerprints the inputs (a checkpoint with another key is ignored); `on_log` gets
    every log row (rank 0 only); `extra` is stored with each checkpoint (checkpoint.read_extra).
    `reference` gives the reference log-probs: a frozen model or the reference stage's cache;
    None when `params.reference_free` (then it must be None: no reference is silently ignored).
    Under torchrun, `policy` is the DDP-wrapped scorer and every rank calls this.
    """
    if (reference is None) != params.reference_free:
        raise ValueError("pass reference=None exactly when train.reference_free is true")
    torch.manual_seed(params.seed)
    ctx = make_context(policy, params, runtime, pad_token_id, len(dataset))
    found = checkpoint.latest(checkpoint_dir, run_key)
    if found is not None:
        restored = checkpoint.restore(found, ctx.scheduler)
        load_full_states(policy, ctx.optimizer, restored.model_state, restored.optimizer_state)
        ctx.progress, ctx.log = restored.progress, restored.log
        print(f"resuming from {found} (step {ctx.progress.step})")
    policy.train()
    started, pairs_run, tokens_run = time.perf_counter(), 0, 0
    last = total_steps(params, len(dataset), ctx.world)
    lengths = pair_lengths(dataset)
    progress_bar = bar(
        total=last,
        initial=ctx.progress.step,
        desc="train",
        unit="step",
        disable=not ctx.world.is_main,
    )
    window, planned_epoch, steps = Window(), -1, []
    while ctx.progress.step < last:
        if planned_epoch != ctx.progress.epoch:  # the plan is fixed per epoch: build it once
            planned_epoch = ctx.progress.epoch
            steps = optimizer_steps(
                epoch_plan(lengths, params, planned_epoch, ctx.world),
                params.batch_size * ctx.world.size,
                params.grad_accum,
            )
        t0 = time.perf_counter()
        metrics, grad_norm, pairs, tokens = optimizer_step(
            policy, reference, dataset, steps[ctx.progress.step_in_epoch], ctx
        )
        window.add(metrics, pairs, grad_norm, tokens, time.perf_counter() - t0)
        pairs_run, tokens_run = pairs_run + pairs, tokens_run + tokens
        epoch = ctx.progress.epoch + (ctx.progress.step_in_epoch + 1) / len(steps)
        _advance(ctx.progress, metrics["loss"], pairs, len(steps), ctx.world.is_main)
        progress_bar.update(1)
        progress_bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}"
        )
        if _log_due(ctx.progress, params, last):
            ctx.log.append(window.row(ctx.progress.step, epoch, ctx.scheduler.get_last_lr()[0]))
            window = Window()
            if on_log is not None and ctx.world.is_main:
                on_log(ctx.log[-1])
        if ctx.progress.step % params.save_every == 0 or ctx.progress.step == last:
            _save(checkpoint_dir, policy, ctx, run_key, extra)
    progress_bar.close()
    if isinstance(reference, ModelReference):
        assert_frozen(reference.model)  # nothing in the loop may have unfrozen it
    seconds = time.perf_counter() - started
    return TrainResult(
        ctx.progress.step,
        ctx.log,
        ctx.progress.epoch_losses,
        seconds,
        pairs_run / max(seconds, 1e-9),
        tokens_run / max(seconds, 1e-9),
        padding_report(lengths, params),
    )


def _log_due(progress: Progress, params: TrainParams, last: int) -> bool:
    """Every log_every steps, at the last step and at the end of each epoch."""
    return (
        progress.step % params.log_every == 0
        or progress.step == last
        or progress.step_in_epoch == 0
    )


def _save(
    folder: Path,
    policy: torch.nn.Module,
    ctx: TrainContext,
    run_key: str,
    extra: dict[str, Any] | None,
) -> None:
    """Every rank gathers (a collective under FSDP), rank 0 writes, the others wait for it."""
    model_state, optimizer_state = full_states(policy, ctx.optimizer)
    if ctx.world.is_main:
        checkpoint.save(
            folder,
            model_state,
            optimizer_state,
            ctx.scheduler,
            ctx.progress,
            ctx.log,
            run_key,
            extra,
        )
    barrier(ctx.world)


def _advance(
    progress: Progress, loss: float, pairs: int, steps_in_epoch: int, announce: bool = True
) -> None:
    progress.step += 1
    progress.step_in_epoch += 1
    progress.epoch_loss_sum += loss * pairs
    progress.epoch_pairs += pairs
    if progress.step_in_epoch == steps_in_epoch:
        progress.epoch += 1
        progress.step_in_epoch = 0
        average = progress.epoch_loss_sum / progress.epoch_pairs
        progress.epoch_losses.append(average)
        progress.epoch_loss_sum, progress.epoch_pairs = 0.0, 0
        if announce:
            tqdm.write(f"Epoch {progress.epoch} DPO Loss (Avg): {average:.4f}")
