"""Held-out evaluation: completion log-probs under a model, implicit rewards, ranking metrics.

Metric definitions (DESIGN.md): implicit reward r(y) = beta * (logp_policy(y|x) - logp_ref(y|x));
win rate = share of pairs with r(y_w) > r(y_l), a tie counting one half; Kendall's tau per
question over its distinct answers (tau-b), averaged over questions with >= 3 distinct answers.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from pipeline.batching import collate_pairs
from pipeline.dpo import dpo_loss
from pipeline.modeling import Runtime, batch_logps
from pipeline.progress import bar
from pipeline.ranking import kendall_tau, pairwise_tau, win_rate


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel,
    dataset: Any,
    batch_size: int,
    runtime: Runtime,
    pad_token_id: int,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed completion log-probs of every pair, float64 arrays (N,)."""
    model.eval()
    chosen, rejected = [], []
    for start in bar(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
        rows = dataset[start : start + batch_size]
        batch = collate_pairs(rows, pad_token_id).to(runtime.device)
        logps = batch_logps(model, batch, runtime).double().cpu().numpy()
        chosen.append(logps[: batch.n_pairs])
        rejected.append(logps[batch.n_pairs :])
    return np.concatenate(chosen), np.concatenate(rejected)


def answer_ids(token_lists: list[list[int]]) -> list[str]:
    """A stable id per answer: the hash of its token ids (same answer text -> same id)."""
    return [
        hashlib.blake2b(np.asarray(t, np.int64).tobytes(), digest_size=12).hexdigest()
        for t in token_lists
    ]


def reward_metrics(
    policy: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    beta: float,
    dataset: Any,
) -> dict[str, float]:
    """All eval metrics of a policy against the reference on the tokenized eval pairs."""
    chosen_rewards = beta * (policy[0] - reference[0])
    rejected_rewards = beta * (policy[1] - reference[1])
    losses, _, _ = dpo_loss(*(torch.from_numpy(a) for a in (*policy, *reference)), beta=beta)
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
        "eval_loss": float(losses.mean()),
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "pairs": len(chosen_rewards),
    }


def margin_histogram(
    policy: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    beta: float,
    bins: int = 30,
) -> list[dict[str, float]]:
    """Rows (margin bin centre, pairs) of the reward-margin histogram, for a DVC plot."""
    margins = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    counts, edges = np.histogram(margins, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    return [
        {"margin": round(float(c), 6), "pairs": int(n)}
        for c, n in zip(centres, counts, strict=True)
    ]
