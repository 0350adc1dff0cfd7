"""The DPO objective as pure tensor functions: no I/O, no model code.

Notation (DESIGN.md, "DPO in one screen"): for a prompt x with a chosen answer y_w and a rejected
answer y_l, `logp(y|x)` is the sum of the log-probs of the completion tokens only, the implicit
reward is `r(y) = beta * (logp_policy(y|x) - logp_reference(y|x))` and the per-pair loss is
`-log sigmoid(r(y_w) - r(y_l))`, exactly ln 2 while the policy equals the reference.

Batches hold the chosen rows first and the rejected rows after them (`[chosen; rejected]`), so one
forward pass scores both answers of every pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: The names of the per-step training metrics, in logging order. `step_metrics` is the only
#: function that produces them; loggers and plots should read the names from here.
STEP_METRIC_KEYS: tuple[str, ...] = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll/chosen",
)


def _scored_positions(mask: Tensor) -> Tensor:
    """Which shifted positions are scored: mask of the *label* at t+1, shape (B, T-1), bool.

    `mask[:, 0]` is never used: the first token has no logit predicting it.
    """
    return mask[:, 1:].bool()


def sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probs of the completion tokens of every row.

    Args:
        logits: (B, T, V) causal-LM logits over `labels`; any float dtype (bf16 is fine).
        labels: (B, T) int64, the input ids the logits were computed from.
        mask: (B, T) bool or int, 1 on completion tokens only (prompt and padding 0).

    Returns:
        (B,) float32: sum over t of mask[t+1] * log softmax(logits[t])[labels[t+1]]. A row with no
        completion token scores 0 (never NaN).

    The logit at position t predicts token t+1, hence the shift by one. Only the completion
    positions are gathered before the softmax, so prompt and padding labels are never looked up
    (a padding id outside the vocabulary is harmless) and the fp32 copy of the logits covers the
    completion tokens only: with a 152k vocabulary a full fp32 copy of (B, T, V) is what
    exhausts memory. log_softmax(z)[y] is computed as z[y] - logsumexp(z) in float32, so bf16
    logits lose no precision in the normalizer.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) with labels and mask (B, T); got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    scored = _scored_positions(mask)  # (B, T-1)
    rows = scored.nonzero(as_tuple=True)[0]  # (N,) row of each scored token
    selected = logits[:, :-1][scored]  # (N, V), completion positions only
    targets = labels[:, 1:][scored]  # (N,)
    # Gathering before the cast is exact: every bf16/fp16 value is representable in fp32.
    picked = selected.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (N,)
    token_logps = picked - torch.logsumexp(selected.float(), dim=-1)  # (N,)
    totals = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    return totals.index_add(0, rows, token_logps)


def completion_token_counts(mask: Tensor) -> Tensor:
    """Number of tokens `sequence_logps` scores per row.

    Args:
        mask: (B, T) bool or int completion mask, as given to `sequence_logps`.

    Returns:
        (B,) int64: mask[:, 1:].sum(-1); the first position is never scored (nothing predicts it).
    """
    return _scored_positions(mask).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair sigmoid DPO loss and implicit rewards.

    Args:
        policy_chosen_logps: (B,) logp_policy(y_w|x).
        policy_rejected_logps: (B,) logp_policy(y_l|x).
        ref_chosen_logps: (B,) logp_reference(y_w|x).
        ref_rejected_logps: (B,) logp_reference(y_l|x).
        beta: strength of the implicit KL penalty towards the reference.

    Returns:
        losses: (B,) -log sigmoid(beta * ((pc - rc) - (pr - rr))), with gradient.
        chosen_rewards: (B,) beta * (pc - rc), detached.
        rejected_rewards: (B,) beta * (pr - rr), detached.

    logsigmoid is evaluated stably for any margin; log(sigmoid(x)) would give -inf (and NaN
    gradients) once sigmoid(x) underflows, around x < -104 in float32.
    """
    shapes = {
        tuple(t.shape)
        for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    }
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss expects four (B,) tensors of one shape; got {sorted(shapes)}")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_log_ratio - rejected_log_ratio))
    return losses, (beta * chosen_log_ratio).detach(), (beta * rejected_log_ratio).detach()


def split_concatenated(t: Tensor, n_pairs: int) -> tuple[Tensor, Tensor]:
    """Split a `[chosen; rejected]` batch: (2 * n_pairs, ...) -> two (n_pairs, ...) views."""
    if t.shape[0] != 2 * n_pairs:
        raise ValueError(f"expected {2 * n_pairs} rows for {n_pairs} pairs, got {t.shape[0]}")
    return t[:n_pairs], t[n_pairs:]


def step_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_nll: Tensor,
) -> dict[str, float]:
    """Batch means of the training metrics, keyed by `STEP_METRIC_KEYS` in that order.

    Args:
        losses, chosen_rewards, rejected_rewards: (B,) as returned by `dpo_loss` (or by
            `pipeline.losses.compute_loss` for the other variants).
        policy_chosen_logps, policy_rejected_logps: (B,) summed completion log-probs.
        chosen_nll: (B,) per-token NLL of the chosen answer (the RPO term, logged whether or not
            it is in the loss).

    "rewards/accuracies" is the win rate of DESIGN.md: the share of pairs whose chosen reward
    exceeds the rejected one, a tie counting one half, so it reads 0.5 at step 1 when every
    reward is 0. TRL counts strict `>` only (0.0 at step 1): the two differ on ties alone.
    """
    ties = (chosen_rewards == rejected_rewards).double()
    wins = (chosen_rewards > rejected_rewards).double() + 0.5 * ties
    values = (
        losses,
        chosen_rewards,
        rejected_rewards,
        chosen_rewards - rejected_rewards,
        wins,
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_nll,
    )
    # float() on a detached mean: metrics are plain numbers, they never carry the graph.
    return {
        key: float(v.detach().double().mean())
        for key, v in zip(STEP_METRIC_KEYS, values, strict=True)
    }
