"""DPO loss variants: small pure functions over (B,) tensors; `compute_loss` picks one by name.

Notation (docs/objective.md, "Metrics" and "Loss variants"): per pair, `pc`/`pr` are the
policy's summed completion log-probs of the chosen/rejected answer, `rc`/`rr` the reference's,
`nc`/`nr` the numbers of completion tokens scored. The log-ratio margin is

    h = (pc - rc) - (pr - rr)

and its length-normalised form (per-token averages, used by IPO) is

    h_avg = (pc - rc) / nc - (pr - rr) / nr.

`compute_loss` maps a `PairLogps` to the variant's (B,) per-pair losses, adds the optional NLL term
on the chosen answer (RPO) and the implicit rewards the trainer logs. Rewards are
`beta * (policy - reference)` for every variant except the reference-free SimPO, whose implicit
reward is `beta * (policy / tokens)` (the quantity its loss compares).

Reference-free training (`PairLogps.from_concatenated(..., reference=None, ...)`) sets the
reference log-probs to 0: then `h` is the plain policy margin `pc - pr`.
"""

from __future__ import annotations

import dataclasses
import typing

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.params import REFERENCE_FREE, LossName, LossParams


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Everything a loss variant may read, one (B,) tensor per field, pair i in row i."""

    policy_chosen: Tensor  # (B,) summed completion log-probs of y_w under the policy (with grad)
    policy_rejected: Tensor  # (B,) same for y_l
    ref_chosen: Tensor  # (B,) under the reference (no grad); zeros when reference-free
    ref_rejected: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,) completion tokens scored for y_w (metrics.completion_token_counts)
    rejected_tokens: Tensor  # (B,)

    def __post_init__(self) -> None:
        # Not dataclasses.astuple: it deep-copies, and a non-leaf tensor refuses to be copied.
        shapes = {tuple(getattr(self, f.name).shape) for f in dataclasses.fields(self)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(
                f"PairLogps expects six (B,) tensors of one shape; got {sorted(shapes)}"
            )

    @classmethod
    def from_concatenated(
        cls, policy: Tensor, reference: Tensor | None, token_counts: Tensor, n_pairs: int
    ) -> PairLogps:
        """Split `[chosen; rejected]` (2B,) tensors; `reference=None` is reference-free (zeros)."""
        if policy.shape != (2 * n_pairs,) or token_counts.shape != (2 * n_pairs,):
            raise ValueError(f"expected (2 * {n_pairs},) tensors, got {tuple(policy.shape)}")
        if reference is None:
            reference = torch.zeros_like(policy).detach()
        return cls(
            policy[:n_pairs],
            policy[n_pairs:],
            reference[:n_pairs],
            reference[n_pairs:],
            token_counts[:n_pairs],
            token_counts[n_pairs:],
        )

    def chosen_log_ratio(self) -> Tensor:
        """(B,) pc - rc."""
        return self.policy_chosen - self.ref_chosen

    def rejected_log_ratio(self) -> Tensor:
        """(B,) pr - rr."""
        return self.policy_rejected - self.ref_rejected

    def margin(self) -> Tensor:
        """(B,) h = (pc - rc) - (pr - rr)."""
        return self.chosen_log_ratio() - self.rejected_log_ratio()

    def average_margin(self) -> Tensor:
        """(B,) h_avg = (pc - rc) / nc - (pr - rr) / nr."""
        return per_token(self.chosen_log_ratio(), self.chosen_tokens) - per_token(
            self.rejected_log_ratio(), self.rejected_tokens
        )

    def average_policy(self) -> tuple[Tensor, Tensor]:
        """((B,), (B,)) per-token average policy log-probs pc / nc and pr / nr."""
        return (
            per_token(self.policy_chosen, self.chosen_tokens),
            per_token(self.policy_rejected, self.rejected_tokens),
        )


def per_token(total: Tensor, tokens: Tensor) -> Tensor:
    """(B,) total / tokens; a row with no token counts as one, so an empty completion gives 0, not
    NaN (its summed log-prob is 0)."""
    return total / tokens.clamp(min=1).to(total.dtype)


def sigmoid_loss(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023), conservative with eps = label_smoothing (cDPO, Mitchell 2023).

    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h);  (B,) -> (B,).

    eps is the assumed chance that a label is wrong: the loss is minimised at a finite margin,
    sigmoid(beta * h) = 1 - eps, instead of pushing h to infinity. eps = 0 is plain DPO.
    """
    z = beta * margin
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust_loss(margin: Tensor, beta: float, flip_rate: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), flip rate eps in [0, 0.5).

    loss = ((1 - eps) * -log sigmoid(beta * h) - eps * -log sigmoid(-beta * h)) / (1 - 2 * eps);
    (B,) -> (B,).

    Unbiased under labels flipped with probability eps: (1 - eps) * loss(h) + eps * loss(-h) equals
    the clean loss -log sigmoid(beta * h). Unlike cDPO it can be negative for large |h|.
    """
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(
            f"label_smoothing (the robust flip rate) must be in [0, 0.5), got {flip_rate}"
        )
    z = beta * margin
    clean, flipped = -F.logsigmoid(z), -F.logsigmoid(-z)
    return ((1.0 - flip_rate) * clean - flip_rate * flipped) / (1.0 - 2.0 * flip_rate)


def ipo_loss(average_margin: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17 with tau = beta) on length-normalised log-ratios.

    loss = (h_avg - 1 / (2 * beta))^2;  (B,) -> (B,).

    h_avg uses per-token average log-probs, as the IPO authors intend (summed log-probs would make
    the squared target scale with the answers' lengths). The loss regresses the margin onto
    1 / (2 beta): past it, the gradient pushes the margin back.
    """
    return (average_margin - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(margin: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023) on the DPO margin.

    loss = relu(1 - beta * h);  (B,) -> (B,). No gradient once beta * h >= 1.
    """
    return torch.relu(1.0 - beta * margin)


def simpo_loss(avg_chosen: Tensor, avg_rejected: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma.

    loss = -log sigmoid(beta * (pc / nc - pr / nr) - gamma);  (B,), (B,) -> (B,).
    """
    return -F.logsigmoid(beta * (avg_chosen - avg_rejected) - gamma)


def chosen_nll(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Per-token average NLL of the chosen answer (the RPO term, Pang et al. 2024).

    nll = -pc / nc;  (B,), (B,) -> (B,). Averaged per pair, so every pair weighs the same
    whatever its length.
    """
    return -per_token(policy_chosen, chosen_tokens)


@dataclasses.dataclass(frozen=True)
class LossOutput:
    losses: Tensor  # (B,) per-pair loss with grad, the NLL term included when sft_weight > 0
    chosen_rewards: Tensor  # (B,) implicit reward of y_w, detached
    rejected_rewards: Tensor  # (B,) implicit reward of y_l, detached
    nll: Tensor  # (B,) per-token NLL of y_w, detached (logged whatever sft_weight is)


def implicit_rewards(name: str, logps: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    """((B,), (B,)) detached rewards of y_w and y_l: what the variant's margin is built from."""
    if name in REFERENCE_FREE:
        chosen, rejected = logps.average_policy()
    else:
        chosen, rejected = logps.chosen_log_ratio(), logps.rejected_log_ratio()
    return (beta * chosen).detach(), (beta * rejected).detach()


def compute_loss(logps: PairLogps, loss: LossParams) -> LossOutput:
    """Per-pair losses of `loss.variant` plus sft_weight * NLL(y_w), and the implicit rewards.

    losses = variant(logps) + sft_weight * (-pc / nc), all (B,). The trainer sums `losses` over
    the pairs of an optimizer step and divides by their number, whatever the variant. `loss` was
    validated when params were parsed: nothing is checked again per batch.
    """
    if loss.variant == "sigmoid":
        losses = sigmoid_loss(logps.margin(), loss.beta, loss.label_smoothing)
    elif loss.variant == "robust":
        losses = robust_loss(logps.margin(), loss.beta, loss.label_smoothing)
    elif loss.variant == "ipo":
        losses = ipo_loss(logps.average_margin(), loss.beta)
    elif loss.variant == "hinge":
        losses = hinge_loss(logps.margin(), loss.beta)
    elif loss.variant == "simpo":
        losses = simpo_loss(*logps.average_policy(), loss.beta, loss.gamma)
    else:
        raise ValueError(f"unknown loss variant {loss.variant!r} (known: {VARIANTS})")
    nll = chosen_nll(logps.policy_chosen, logps.chosen_tokens)
    if loss.sft_weight:  # skip the add when off: losses stay bit-identical to the plain variant
        losses = losses + loss.sft_weight * nll
    chosen_rewards, rejected_rewards = implicit_rewards(loss.variant, logps, loss.beta)
    return LossOutput(losses, chosen_rewards, rejected_rewards, nll.detach())


#: Every variant `compute_loss` knows, in params.yaml's spelling.
VARIANTS: tuple[str, ...] = typing.get_args(LossName)
