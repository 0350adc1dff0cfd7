"""Plain implementations the fast code is checked against: nothing here runs in the pipeline.

* `sequence_logps`: completion log-probs from the full (B, T, V) logits, the textbook way. The
  pipeline's scorer (pipeline/model/scoring.py) never builds those logits; tests check it gives the
  same numbers.
* `full_logits_logps`: a causal LM's `[chosen; rejected]` batch scored through `sequence_logps`.
* `dpo_loss`: the sigmoid DPO loss written straight from the paper's formula, independent of
  `pipeline.objective.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


def full_logits_logps(model: torch.nn.Module, batch) -> Tensor:
    """(2B,) fp32 summed completion log-probs of a PairBatch from a plain causal LM's logits."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    return sequence_logps(logits, batch.input_ids, batch.completion_mask)
