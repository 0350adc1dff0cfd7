"""Held-out evaluation: completion log-probs under a model, implicit rewards, ranking metrics.

Metric definitions (DESIGN.md): implicit reward r(y) = beta * (logp_policy(y|x) - logp_ref(y|x))
(reference-free variants: see `pipeline.losses.implicit_rewards`);
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
from pipeline.losses import LossOutput, PairLogps, compute_loss
from pipeline.modeling import Runtime, batch_logps
from pipeline.params import TrainParams
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


Scores = tuple[np.ndarray, np.ndarray]  # (chosen, rejected) summed log-probs, (N,) each


def scored_tokens(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,), (N,)) completion tokens scored per answer, as `dpo.completion_token_counts` counts
    them in a batch: every completion token, less the first when the prompt is empty (nothing
    predicts it)."""
    empty = torch.tensor([len(p) == 0 for p in dataset["prompt_input_ids"]], dtype=torch.int64)
    chosen = torch.tensor([len(c) for c in dataset["chosen_input_ids"]], dtype=torch.int64)
    rejected = torch.tensor([len(r) for r in dataset["rejected_input_ids"]], dtype=torch.int64)
    return chosen - empty, rejected - empty


def pair_losses(policy: Scores, reference: Scores, dataset: Any, train: TrainParams) -> LossOutput:
    """The training loss variant's per-pair losses and implicit rewards, float64, (N,) each.

    Rewards follow the variant: beta * (policy - reference) log-ratios, or for reference-free
    training beta * the policy's own log-probs (per token for SimPO); see `losses.implicit_rewards`.
    """
    chosen_tokens, rejected_tokens = scored_tokens(dataset)
    ref_chosen, ref_rejected = (torch.from_numpy(a) for a in reference)
    if train.reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(ref_chosen), torch.zeros_like(ref_rejected)
    logps = PairLogps(
        torch.from_numpy(policy[0]),
        torch.from_numpy(policy[1]),
        ref_chosen,
        ref_rejected,
        chosen_tokens,
        rejected_tokens,
    )
    return compute_loss(train.loss, logps, train.beta, **train.loss_settings())


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
