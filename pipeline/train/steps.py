"""What every training loop here (the DPO recipe, the reward model's) does with its steps: a
step's figures stay on the device, summed over the steps of a log window and read back once per
row, so a step never waits for the device; and whether each step's loss and gradient norm were
finite is read at the same moments, before any row or checkpoint uses its weights."""

from __future__ import annotations

import math
import time

import torch

from pipeline.stage_io import StageError

# A logged loss above this (10 x ln 2; ln 2 is the loss of a policy equal to its reference, and
# of a reward model that cannot tell the answers apart) means the run diverged, even when the
# loss later settles: the champion gate keeps such a run out.
DIVERGED_LOSS = 10 * math.log(2)


def diverged(max_loss: float) -> bool:
    return bool(max_loss > DIVERGED_LOSS)


class NonFiniteLoss(StageError, FloatingPointError):
    """Raised when a loss or gradient norm is NaN/inf; the last good checkpoint is kept."""


class OutOfMemory(StageError, RuntimeError):
    """The accelerator ran out of memory in a step; the message names the settings to lower."""


class FiniteFlags:
    """Each step's [loss finite, grad norm finite] flags, on the device until `check`."""

    def __init__(self, loss_name: str) -> None:
        self.loss_name = loss_name  # "DPO": the error says "non-finite DPO loss at step 3"
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss_finite: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Step `step`'s flags: `loss_finite` (a bool scalar) and its grad norm's."""
        self.pending.append((step, torch.stack([loss_finite, torch.isfinite(grad_norm)])))

    def check(self) -> None:
        """One read of the flags added since the last check; NonFiniteLoss names the first step
        whose loss or grad norm was NaN/inf."""
        if not self.pending:
            return
        steps, flags = zip(*self.pending, strict=True)
        self.pending = []
        for step, (loss_ok, grad_ok) in zip(steps, torch.stack(flags).tolist(), strict=True):
            if not loss_ok:
                raise NonFiniteLoss(f"non-finite {self.loss_name} loss at step {step}")
            if not grad_ok:
                raise NonFiniteLoss(f"non-finite gradient norm at step {step}")


class Window:
    """The steps since the last log row: their figure sums (a device tensor), grad norms and
    pairs, and when the first of them began."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | float = 0.0
        self.steps = self.pairs = 0
        self.started: float | None = None

    def add(self, sums: torch.Tensor, grad_norm: torch.Tensor, pairs: int, started: float) -> None:
        """A step begun at `started` (perf_counter) with these figures."""
        self.started = started if self.started is None else self.started
        self.sums = sums if self.sums is None else self.sums + sums
        self.grad_norm = self.grad_norm + grad_norm
        self.steps, self.pairs = self.steps + 1, self.pairs + pairs

    def close(self) -> tuple[list[float], float, float]:
        """(the sums, the mean grad norm, seconds since the first step), read back in one go,
        and the window starts over. The seconds end at this read, which waited for the device:
        the steps only queue their work, so their own durations would leave the device's out."""
        assert self.sums is not None and self.started is not None, "no step in the window"
        sums, grad_norm = self.sums.tolist(), float(self.grad_norm) / self.steps
        seconds = time.perf_counter() - self.started
        self.reset()
        return sums, grad_norm, seconds
