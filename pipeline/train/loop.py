"""The DPO training loop: AdamW with linear warmup/decay, resumable from checkpoints.

`train_policy` runs the optimizer steps of `pipeline.train.step` in the order that
`pipeline.train.plan` fixes per epoch, averages their metrics over the pairs of each logging
window, writes a checkpoint every `save_every` steps and resumes from the newest one made from
the same inputs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.model.loading import Runtime, assert_frozen
from pipeline.model.reference import ModelReference, ReferenceScores
from pipeline.objective.metrics import STEP_METRIC_KEYS
from pipeline.params import TrainParams
from pipeline.stage_io import Interrupted, bar
from pipeline.train import checkpoint
from pipeline.train.checkpoint import Progress
from pipeline.train.distributed import (
    barrier,
    full_states,
    load_full_states,
)
from pipeline.train.plan import epoch_steps, padding_report, pair_lengths, total_steps
from pipeline.train.step import OutOfMemory, TrainContext, make_context, optimizer_step

# Every row of plots/train.csv (and of the MLflow step metrics) has exactly these keys.
LOG_KEYS = ("step", "epoch", *STEP_METRIC_KEYS, "grad_norm", "lr", "tokens/s", "pairs/s")
LogCallback = Callable[[dict[str, float]], None]


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


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where the run's checkpoints live and what a resumable one must match."""

    folder: Path
    run_key: str  # fingerprint of the inputs (train.run_key): a checkpoint with another is ignored
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # stored with each checkpoint


def train_policy(
    policy: torch.nn.Module,
    reference: ReferenceScores | None,
    dataset: Any,
    params: TrainParams,
    runtime: Runtime,
    pad_token_id: int,
    resume: Resume,
    on_log: LogCallback | None = None,
    every_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Train `policy` in place on the tokenized `dataset`, resuming from `resume.folder`.

    `reference` gives the reference log-probs: the reference stage's cache, a frozen model, or
    the policy itself with its LoRA adapters off;
    None exactly when `params.reference_free` (a reference is never silently ignored). `on_log`
    gets every log row (rank 0 only); `every_step` runs after each optimizer step on every rank
    (the train stage re-divides its CPU threads there). Under torchrun, `policy` is the
    DDP-wrapped (or FSDP-sharded) scorer and every rank calls this.
    """
    if (reference is None) != params.reference_free:
        raise ValueError("pass reference=None exactly when train.reference_free is true")
    torch.manual_seed(params.seed)
    lengths = pair_lengths(dataset)
    ctx = make_context(policy, params, runtime, pad_token_id, lengths)
    _resume(policy, ctx, resume)
    policy.train()
    started, done = time.perf_counter(), Window()  # `done`: pairs and tokens of this process
    last = total_steps(params, len(dataset), ctx.world)
    show = bar(total=last, initial=ctx.progress.step, desc="train", unit="step",
               disable=not ctx.world.is_main)  # fmt: skip
    window, planned_epoch, steps = Window(), -1, []
    saved = ctx.progress.step  # the step of the newest checkpoint (0: none)
    try:
        while ctx.progress.step < last:
            if planned_epoch != ctx.progress.epoch:  # the plan is fixed per epoch: build it once
                planned_epoch = ctx.progress.epoch
                steps = epoch_steps(lengths, params, planned_epoch, ctx.world)
            epoch = ctx.progress.epoch + (ctx.progress.step_in_epoch + 1) / len(steps)
            micro_batches = steps[ctx.progress.step_in_epoch]
            metrics, pairs = _timed_step(policy, reference, dataset, micro_batches, ctx,
                                         (window, done))  # fmt: skip
            _advance(ctx.progress, metrics["loss"], pairs, len(steps), ctx.world.is_main)
            show.update(1)
            if every_step is not None:
                every_step()
            show.set_postfix(loss=f"{metrics['loss']:.4f}",
                             margin=f"{metrics['rewards/margins']:.3f}")  # fmt: skip
            if _log_due(ctx.progress, params, last):
                window = _log_row(ctx, window, epoch, on_log)
            if ctx.progress.step % params.save_every == 0 or ctx.progress.step == last:
                _save(policy, ctx, resume)
                saved = ctx.progress.step
    except KeyboardInterrupt:
        show.close()
        raise Interrupted(_interrupted(ctx.progress.step, last, saved, resume)) from None
    show.close()
    if isinstance(reference, ModelReference):
        assert_frozen(reference.model)  # nothing in the loop may have unfrozen it
    seconds = max(time.perf_counter() - started, 1e-9)
    return TrainResult(
        ctx.progress.step,
        ctx.log,
        ctx.progress.epoch_losses,
        seconds,
        done.pairs / seconds,
        done.tokens / seconds,
        padding_report(lengths, params),
    )


def _timed_step(
    policy: torch.nn.Module,
    reference: ReferenceScores | None,
    dataset: Any,
    micro_batches: list[Any],
    ctx: TrainContext,
    windows: tuple[Window, ...],
) -> tuple[dict[str, float], int]:
    """`optimizer_step`, its wall time and counts added to every window -> (metric means, pairs).

    Running out of accelerator memory becomes an OutOfMemory that says what to lower.
    """
    t0 = time.perf_counter()
    try:
        metrics, grad_norm, pairs, tokens = optimizer_step(
            policy, reference, dataset, micro_batches, ctx
        )
    except torch.cuda.OutOfMemoryError as error:
        raise OutOfMemory(_out_of_memory(ctx, micro_batches)) from error
    seconds = time.perf_counter() - t0
    for window in windows:
        window.add(metrics, pairs, grad_norm, tokens, seconds)
    return metrics, pairs


def _out_of_memory(ctx: TrainContext, micro_batches: list[Any]) -> str:
    """What ran out of memory, what to lower, and what is kept."""
    budget = ctx.params.max_tokens_per_micro_batch
    longest = max(int(ctx.lengths[m].max()) for m in micro_batches)
    kept = ctx.progress.step - ctx.progress.step % ctx.params.save_every
    lower = f"lower train.max_tokens_per_micro_batch (now {budget or 'no limit'})"
    if not ctx.params.gradient_checkpointing:
        lower += " or set train.gradient_checkpointing: true"
    keep = f"the checkpoint of step {kept} is kept, a re-run resumes from it" if kept else ""
    return (
        f"out of accelerator memory in step {ctx.progress.step + 1} (longest sequence {longest} "
        f"tokens): {lower}" + (f"; {keep}" if keep else "")
    )


def _interrupted(step: int, last: int, saved: int, resume: Resume) -> str:
    """What an interrupt leaves: the checkpoint a re-run resumes from, or none."""
    where = f"stopped after step {step} of {last}"
    if not saved:
        return f"{where}, before the first checkpoint (train.save_every): nothing to resume from"
    return (
        f"{where}; the checkpoint of step {saved} is kept in {resume.folder}: run the same "
        "command again to resume from it"
    )


def _resume(policy: torch.nn.Module, ctx: TrainContext, resume: Resume) -> None:
    """Load the newest checkpoint made from the same inputs, if any, into policy and context."""
    found = checkpoint.latest(resume.folder, resume.run_key)
    if found is None:
        return
    restored = checkpoint.restore(found, ctx.scheduler)
    load_full_states(policy, ctx.optimizer, restored.model_state, restored.optimizer_state)
    ctx.progress, ctx.log = restored.progress, restored.log
    print(f"resuming from {found} (step {ctx.progress.step})")


def _log_due(progress: Progress, params: TrainParams, last: int) -> bool:
    """Every log_every steps, at the last step and at the end of each epoch."""
    return (
        progress.step % params.log_every == 0
        or progress.step == last
        or progress.step_in_epoch == 0
    )


def _log_row(ctx: TrainContext, window: Window, epoch: float, on_log: LogCallback | None) -> Window:
    """Close the window into a log row, hand it to `on_log` (rank 0); return a fresh window."""
    ctx.log.append(window.row(ctx.progress.step, epoch, ctx.scheduler.get_last_lr()[0]))
    if on_log is not None and ctx.world.is_main:
        on_log(ctx.log[-1])
    return Window()


def _save(policy: torch.nn.Module, ctx: TrainContext, resume: Resume) -> None:
    """Every rank gathers (a collective under FSDP), rank 0 writes, the others wait for it."""
    model_state, optimizer_state = full_states(policy, ctx.optimizer)
    if ctx.world.is_main:
        checkpoint.save(
            resume.folder,
            model_state,
            optimizer_state,
            ctx.scheduler,
            ctx.progress,
            ctx.log,
            resume.run_key,
            resume.extra,
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
