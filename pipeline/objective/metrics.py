"""What the objective counts and reports: completion tokens per answer, per-step metric means.

Batches hold the chosen rows first and the rejected rows after them (`[chosen; rejected]`), so one
forward pass scores both answers of every pair. The token counts here are the `n` of the
length-normalised variants (docs/objective.md, "Loss variants") and must match what the scorer
sums over.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: The names of the per-step training metrics, in logging order. `step_metric_means` is the
#: only function that produces them; loggers and plots read the names from here.
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


def completion_token_counts(mask: Tensor) -> Tensor:
    """Number of completion tokens the scorer sums per row of a batch.

    Args:
        mask: (B, T) bool or int, 1 on completion tokens only (prompt and padding 0).

    Returns:
        (B,) int64: mask[:, 1:].sum(-1). The logit at position t predicts token t + 1, so the
        first position is never scored (nothing predicts it).
    """
    return mask[:, 1:].bool().sum(dim=-1)


def dataset_token_counts(dataset: Any) -> tuple[Tensor, Tensor]:
    """((N,), (N,)) completion tokens scored per chosen and rejected answer of tokenized pairs.

    The same count `completion_token_counts` gives on a batch: every completion token, less the
    first when the prompt is empty (nothing predicts it).
    """
    empty = torch.tensor([len(p) == 0 for p in dataset["prompt_input_ids"]], dtype=torch.int64)
    chosen = torch.tensor([len(c) for c in dataset["chosen_input_ids"]], dtype=torch.int64)
    rejected = torch.tensor([len(r) for r in dataset["rejected_input_ids"]], dtype=torch.int64)
    return chosen - empty, rejected - empty


def step_metric_means(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_nll: Tensor,
) -> Tensor:
    """Batch means of the training metrics as one (8,) float64 tensor on the batch's device,
    in `STEP_METRIC_KEYS` order: the training loop sums them there and reads them back once per
    log row, so a step never waits for the device.

    Args:
        losses, chosen_rewards, rejected_rewards: (B,) as in `losses.LossOutput`.
        policy_chosen_logps, policy_rejected_logps: (B,) summed completion log-probs.
        chosen_nll: (B,) per-token NLL of the chosen answer (the RPO term, logged whether or not
            it is in the loss).

    "rewards/accuracies" is the held-out win rate's rule (docs/objective.md, "Metrics"): the
    share of pairs whose chosen reward exceeds the rejected one, a tie counting one half, so it
    reads 0.5 at step 1 when every reward is 0. TRL counts strict `>` only (0.0 at step 1): the
    two differ on ties alone.
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
    # Detached: metrics never carry the graph.
    return torch.stack([v.detach().double().mean() for v in values])
