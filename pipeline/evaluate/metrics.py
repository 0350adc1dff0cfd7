"""Held-out evaluation: implicit rewards and ranking metrics from scored pairs.

Metric definitions (docs/objective.md, "Metrics"): implicit reward r(y) = beta * (logp_policy(y|x) -
logp_ref(y|x)) (reference-free variants: see `pipeline.objective.losses.implicit_rewards`); win
rate = share of pairs with r(y_w) > r(y_l), a tie counting one half; Kendall's tau per question
over its distinct answers (tau-b), averaged over questions with >= 3 distinct answers.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from pipeline.evaluate.ranking import kendall_tau, pairwise_tau, win_rate
from pipeline.objective.losses import LossOutput, PairLogps, compute_loss
from pipeline.objective.metrics import dataset_token_counts
from pipeline.params import LossParams


def answer_ids(token_lists: list[list[int]]) -> list[str]:
    """A stable id per answer: the hash of its token ids (same answer text -> same id)."""
    return [
        hashlib.blake2b(np.asarray(t, np.int64).tobytes(), digest_size=12).hexdigest()
        for t in token_lists
    ]


Scores = tuple[np.ndarray, np.ndarray]  # (chosen, rejected) summed log-probs, (N,) each


def pair_losses(policy: Scores, reference: Scores, dataset: Any, loss: LossParams) -> LossOutput:
    """The training loss variant's per-pair losses and implicit rewards, float64, (N,) each.

    Rewards follow the variant: beta * (policy - reference) log-ratios, or for reference-free
    training beta * the policy's own log-probs (per token for SimPO); see
    `pipeline.objective.losses.implicit_rewards`.
    """
    chosen_tokens, rejected_tokens = dataset_token_counts(dataset)
    ref_chosen, ref_rejected = (torch.from_numpy(a) for a in reference)
    if loss.reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(ref_chosen), torch.zeros_like(ref_rejected)
    logps = PairLogps(
        torch.from_numpy(policy[0]),
        torch.from_numpy(policy[1]),
        ref_chosen,
        ref_rejected,
        chosen_tokens,
        rejected_tokens,
    )
    return compute_loss(logps, loss)


def reward_metrics(scored: LossOutput, dataset: Any) -> dict[str, float]:
    """All eval metrics of one model's `pair_losses` on the tokenized eval pairs."""
    chosen_rewards = scored.chosen_rewards.numpy()
    rejected_rewards = scored.rejected_rewards.numpy()
    tau = kendall_tau(
        dataset["question_id"],
        answer_ids(dataset["chosen_input_ids"]),
        answer_ids(dataset["rejected_input_ids"]),
        chosen_rewards,
        rejected_rewards,
    )
    return {
        "win_rate": win_rate(chosen_rewards, rejected_rewards),
        "kendall_tau": tau.tau,
        "kendall_questions": tau.questions,
        "pairwise_tau": pairwise_tau(chosen_rewards, rejected_rewards),
        "eval_loss": float(scored.losses.mean()),
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "pairs": len(chosen_rewards),
    }


def margin_histogram(scored: LossOutput, bins: int = 30) -> list[dict[str, float]]:
    """Rows (reward-margin bin centre, pairs) of the held-out margin histogram, for a DVC plot."""
    margins = (scored.chosen_rewards - scored.rejected_rewards).numpy()
    counts, edges = np.histogram(margins, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    return [
        {"margin": round(float(c), 6), "pairs": int(n)}
        for c, n in zip(centres, counts, strict=True)
    ]


def evaluate_policy(
    policy: Scores, reference: Scores, dataset: Any, loss: LossParams
) -> tuple[dict[str, Any], LossOutput]:
    """metrics/eval.json's content and the policy's per-pair results (for the histogram).

    The reference is also judged as if it were the policy, under "reference": every log-ratio is
    0, so its win rate is exactly 0.5 (reference-free variants: the base model's own ranking, the
    baseline to beat).
    """
    scored = pair_losses(policy, reference, dataset, loss)
    metrics: dict[str, Any] = reward_metrics(scored, dataset)
    metrics["reference"] = reward_metrics(pair_losses(reference, reference, dataset, loss), dataset)
    return metrics, scored


# What metrics/eval.json holds, for `dvc exp show` and the registry; every figure (and the
# reference judged as a policy) goes to reports/eval.json and MLflow.
HEADLINE = ("win_rate", "kendall_tau", "eval_loss", "pairwise_tau", "pairs")


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few held-out figures worth a column in `dvc exp show`."""
    return {key: metrics[key] for key in HEADLINE}


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (e.g. tau when no question has 3 distinct answers) -> null: strict JSON for tools."""
    return {
        k: json_safe(v) if isinstance(v, dict) else (None if v != v else v)
        for k, v in metrics.items()
    }
