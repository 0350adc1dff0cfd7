"""DPO training, top to bottom: the optimizer step and the loop around it, in one class.

`DPORecipe` takes the policy, its reference log-probs (None when reference-free) and the
tokenized pairs; it builds AdamW with linear warmup and decay and resumes from the newest
checkpoint made from the same inputs. `train` runs the optimizer steps in the order `plan` fixes
per epoch; each step is a forward over `[chosen; rejected]`, the loss
(`pipeline.objective.losses`), backward, clipping and the AdamW update. Metrics are averaged over
the pairs of each log window; a checkpoint is written every save_every steps. The train stage
builds it from the workspace with `pipeline.train.setup`. Leaf modules: plan (batch order),
distributed (DDP/FSDP), checkpoint (files), steps (log window, finite and divergence checks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.model.batches import collate_pairs
from pipeline.model.loading import Runtime, assert_frozen
from pipeline.model.reference import ModelReference, ReferenceScores
from pipeline.model.scoring import batch_logps
from pipeline.objective.losses import PairLogps, compute_loss
from pipeline.objective.metrics import STEP_METRIC_KEYS, completion_token_counts, step_metric_means
from pipeline.params import LossParams, TrainParams
from pipeline.stage_io import Interrupted, bar
from pipeline.train import checkpoint, distributed, plan
from pipeline.train.schedule import linear_schedule
from pipeline.train.steps import FiniteFlags, OutOfMemory, Window, diverged

# Every row of plots/train.csv (and of the MLflow step metrics) has exactly these keys.
LOG_KEYS = ("step", "epoch", *STEP_METRIC_KEYS, "grad_norm", "lr", "tokens/s", "pairs/s")
# Where in the data a run is: saved with every checkpoint, restored on resume.
POSITION = ("step", "epoch", "step_in_epoch", "epoch_loss_sum", "epoch_pairs", "epoch_losses")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a run trains on: the policy (DDP-wrapped or FSDP-sharded under torchrun), the
    reference's log-probs (None exactly when loss.reference_free), the tokenized pairs and the
    token id their batches are padded with."""

    policy: torch.nn.Module
    reference: ReferenceScores | None
    dataset: Any
    pad_token_id: int


@dataclasses.dataclass(frozen=True)
class Hooks:
    """The caller's code in the loop: `on_log` gets every log row (rank 0), `on_step` runs after
    every optimizer step."""

    on_log: Callable[[dict[str, float]], None] | None = None
    on_step: Callable[[], None] | None = None


class DPORecipe:
    """Trains `inputs.policy` in place on the tokenized pairs. Under torchrun every rank builds
    one. Checkpoints go to `slot`, and a run resumes from the newest one with the slot's key."""

    def __init__(
        self,
        inputs: Inputs,
        params: TrainParams,
        loss: LossParams,
        runtime: Runtime,
        slot: checkpoint.Slot,
        hooks: Hooks = Hooks(),
    ) -> None:
        policy, dataset = inputs.policy, inputs.dataset
        if (inputs.reference is None) != loss.reference_free:
            raise ValueError("pass reference=None exactly when loss.reference_free is true")
        self.policy, self.reference, self.dataset = policy, inputs.reference, dataset
        self.params, self.loss, self.runtime = params, loss, runtime
        self.pad_token_id, self.slot, self.hooks = inputs.pad_token_id, slot, hooks
        self.world = distributed.current_world()
        torch.manual_seed(params.seed)
        self.lengths = plan.pair_lengths(dataset)  # (N, 2) prompt and answer tokens per pair
        self.optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],  # all, or the adapters (LoRA)
            lr=params.lr,
            weight_decay=params.weight_decay,
            fused=True if runtime.device.type == "cuda" else None,  # a few launches per step
        )
        self.total = plan.total_steps(params, len(dataset), self.world)
        warmup = int(params.warmup_ratio * self.total)
        self.scheduler = linear_schedule(self.optimizer, warmup, self.total)
        self.step = self.epoch = self.step_in_epoch = self.epoch_pairs = self.saved = 0
        self.epoch_loss_sum: float | torch.Tensor = 0.0  # a device scalar between epoch ends
        self.epoch_losses, self.log = [], []
        # Since the last log row, on the device: metric sums weighted by pairs, then tokens.
        self.window, self.finite = Window(), FiniteFlags("DPO")
        self.done = {"pairs": 0, "tokens": 0, "seconds": 0.0}  # this process's own train() calls
        self._resume()

    def train(self) -> None:
        """Run the steps left. Ctrl-C becomes `Interrupted`, naming the checkpoint a re-run
        resumes from; running out of accelerator memory, `OutOfMemory` naming what to lower."""
        self.policy.train()
        started = time.perf_counter()
        show = bar(
            total=self.total,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.world.is_main,
        )
        steps, planned = [], -1
        try:
            while self.step < self.total:
                if planned != self.epoch:  # the plan is fixed per epoch: build it once
                    planned = self.epoch
                    steps = plan.epoch_steps(self.lengths, self.params, self.epoch, self.world)
                epoch = self.epoch + (self.step_in_epoch + 1) / len(steps)
                micro_batches, step_started = steps[self.step_in_epoch], time.perf_counter()
                try:
                    sums, grad_norm, pairs = self._optimizer_step(micro_batches)
                except torch.cuda.OutOfMemoryError as error:
                    raise OutOfMemory(self._out_of_memory(micro_batches)) from error
                self.window.add(sums, grad_norm.double(), pairs, step_started)
                self.done["pairs"] += pairs
                self._advance(sums[0], pairs, len(steps))
                show.update(1)
                if self.hooks.on_step is not None:
                    self.hooks.on_step()  # the stage re-divides its CPU threads here
                last = self.step == self.total  # a row and a checkpoint at the end, a row per epoch
                if self.step % self.params.log_every == 0 or last or self.step_in_epoch == 0:
                    row = self._log_row(epoch)
                    show.set_postfix(
                        loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3f}"
                    )
                if self.step % self.params.save_every == 0 or last:
                    self._save()
        except KeyboardInterrupt:
            show.close()
            raise Interrupted(self._interrupted()) from None
        show.close()
        self.done["seconds"] += time.perf_counter() - started
        if isinstance(self.reference, ModelReference):
            assert_frozen(self.reference.model)  # nothing in the loop may have unfrozen it

    def _optimizer_step(
        self, micro_batches: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step -> (metric sums and real tokens, grad norm, pairs).

        `micro_batches` are global (all ranks); each runs as one forward, or as several when it
        holds more than max_tokens_per_micro_batch padded tokens, and this rank runs its slice of
        each. The loss is the sum of per-pair losses over the whole step divided by its pairs, so
        accumulation gives the gradient of one large batch; DDP averages gradients over ranks,
        hence the factor world.size. The sums (STEP_METRIC_KEYS weighted by pairs, then the real
        tokens; float64, over all ranks) and the grad norm stay on the device; whether the loss
        and the grad norm were finite is checked before the next log row or checkpoint.
        """
        step_pairs = sum(len(m) for m in micro_batches)
        budget = self.params.max_tokens_per_micro_batch
        parts = [
            part
            for m in micro_batches
            for part in plan.forward_parts(m, self.lengths, self.world, budget)
        ]
        device = self.runtime.device
        sums = torch.zeros(len(STEP_METRIC_KEYS) + 1, dtype=torch.float64, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for i, part in enumerate(parts):
            rows = distributed.rank_slice(part, self.world)
            columns = self.dataset[rows.tolist()]
            batch = collate_pairs(columns, self.pad_token_id, self.params.pad_to_multiple_of)
            batch = batch.to(device)
            policy_logps = batch_logps(self.policy, batch, self.runtime)
            reference_logps = None if self.reference is None else self.reference(batch, rows)
            counts = completion_token_counts(batch.completion_mask)
            logps = PairLogps.from_concatenated(
                policy_logps, reference_logps, counts, batch.n_pairs
            )
            out = compute_loss(logps, self.loss)
            loss = out.losses.sum() * self.world.size / step_pairs
            finite &= torch.isfinite(loss)
            with distributed.no_sync_unless(i == len(parts) - 1, self.policy):  # once per step
                loss.backward()
            means = step_metric_means(
                out.losses,
                out.chosen_rewards,
                out.rejected_rewards,
                logps.policy_chosen,
                logps.policy_rejected,
                out.nll,
            )
            sums[:-1] += means * batch.n_pairs
            sums[-1] += batch.real_tokens
        sums = distributed.all_reduce_sum(sums, self.world)
        grad_norm = distributed.global_grad_norm(self.policy, self.params.max_grad_norm)
        self.finite.add(self.step + 1, finite, grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums, grad_norm, step_pairs

    def _log_row(self, epoch: float) -> dict[str, float]:
        """Close the window into a log row (pair-weighted metric means), hand it on, return it."""
        self.finite.check()
        pairs = self.window.pairs
        (*metric_sums, tokens), grad_norm, seconds = self.window.close()
        row: dict[str, float] = {"step": self.step, "epoch": epoch}
        sums = zip(STEP_METRIC_KEYS, metric_sums, strict=True)
        row.update({key: value / pairs for key, value in sums})
        row["grad_norm"] = grad_norm
        row["lr"] = self.scheduler.get_last_lr()[0]
        row["tokens/s"] = tokens / seconds
        row["pairs/s"] = pairs / seconds
        self.done["tokens"] += int(tokens)
        self.log.append(row)
        if self.hooks.on_log is not None and self.world.is_main:
            self.hooks.on_log(row)
        return row

    def _advance(self, loss_sum: torch.Tensor, pairs: int, steps_in_epoch: int) -> None:
        """One step done (`loss_sum`: its losses summed over pairs, on the device); at an epoch's
        end, its pair-weighted mean loss is recorded."""
        self.step += 1
        self.step_in_epoch += 1
        self.epoch_loss_sum = self.epoch_loss_sum + loss_sum
        self.epoch_pairs += pairs
        if self.step_in_epoch == steps_in_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.epoch_losses.append(float(self.epoch_loss_sum) / self.epoch_pairs)
            self.epoch_loss_sum, self.epoch_pairs = 0.0, 0
            if self.world.is_main:
                tqdm.write(f"Epoch {self.epoch} DPO Loss (Avg): {self.epoch_losses[-1]:.4f}")

    def _resume(self) -> None:
        """Load the newest checkpoint made from the same inputs, if any."""
        found = checkpoint.latest(self.slot.folder, self.slot.key)
        if found is None:
            return
        model_state, optimizer_state, meta = checkpoint.restore(found, self.scheduler)
        distributed.load_full_states(self.policy, self.optimizer, model_state, optimizer_state)
        for name in POSITION:
            setattr(self, name, meta["position"][name])
        self.log, self.saved = meta["log"], self.step
        print(f"resuming from {found} (step {self.step})")

    def _save(self) -> None:
        """Every rank gathers (a collective under FSDP), rank 0 writes, the others wait for it."""
        self.finite.check()
        model_state, optimizer_state = distributed.full_states(self.policy, self.optimizer)
        if self.world.is_main:
            position = {name: getattr(self, name) for name in POSITION}
            position["epoch_loss_sum"] = float(self.epoch_loss_sum)  # JSON: a number
            checkpoint.save(
                self.slot, model_state, optimizer_state, self.scheduler, position, self.log
            )
        distributed.barrier(self.world)
        self.saved = self.step

    def _interrupted(self) -> str:
        where = f"stopped after step {self.step} of {self.total}"
        if not self.saved:
            return f"{where} before the first checkpoint (train.save_every): nothing to resume"
        return (
            f"{where}; the checkpoint of step {self.saved} is kept in {self.slot.folder}: "
            "run the same command again to resume from it"
        )

    def _out_of_memory(self, micro_batches: list[np.ndarray]) -> str:
        budget = self.params.max_tokens_per_micro_batch
        longest = max(int(self.lengths[m].max()) for m in micro_batches)
        lower = f"lower train.max_tokens_per_micro_batch (now {budget or 'no limit'})"
        if not self.params.gradient_checkpointing:
            lower += " or set train.gradient_checkpointing: true"
        kept = f"; the checkpoint of step {self.saved} is kept, a re-run resumes from it"
        return (
            f"out of accelerator memory in step {self.step + 1} (longest sequence {longest} "
            f"tokens): {lower}" + (kept if self.saved else "")
        )

    def summary(self) -> dict[str, Any]:
        """reports/train.json: the run's figures (per-step rows are `log`)."""
        seconds = max(self.done["seconds"], 1e-9)  # this process's time, not a resumed prefix
        max_loss = max(row["loss"] for row in self.log)
        epochs = list(self.epoch_losses)
        if self.epoch_pairs:  # train.max_steps ended the run inside an epoch: its part so far
            epochs.append(float(self.epoch_loss_sum) / self.epoch_pairs)
        return {
            "steps": self.step,
            "final_loss": self.log[-1]["loss"],
            "max_loss": max_loss,
            "diverged": diverged(max_loss),
            "epoch_losses": epochs,
            "train_seconds": round(seconds, 2),
            "pairs_per_s": round(self.done["pairs"] / seconds, 3),
            "tokens_per_s": round(self.done["tokens"] / seconds, 1),
            **plan.padding_report(self.lengths, self.params),
        }
