"""Held-out rewards and metrics follow the training loss variant, against hand-computed values."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest

from pipeline.evaluate.metrics import margin_histogram, pair_losses, reward_metrics
from pipeline.objective.metrics import dataset_token_counts
from tests.helpers import loss_params

DPO = loss_params()
# Three pairs of one question; answer ids a > b > c, and pair 2 is a labelled (a, c).
DATA = datasets.Dataset.from_dict(
    {
        "question_id": ["q"] * 3,
        "pair_id": [0, 1, 2],
        "prompt_input_ids": [[1, 2], [1, 2], []],
        "chosen_input_ids": [[5, 6, 7, 8], [9, 9], [5, 6, 7, 8]],
        "rejected_input_ids": [[9, 9], [3], [3]],
    }
)
POLICY = (np.array([-8.0, -3.0, -6.0]), np.array([-7.0, -4.0, -5.0]))
REFERENCE = (np.array([-9.0, -3.5, -6.0]), np.array([-6.0, -3.0, -5.0]))


def test_scored_tokens_skip_the_unpredicted_first_token_of_an_empty_prompt() -> None:
    chosen, rejected = dataset_token_counts(DATA)
    assert chosen.tolist() == [4, 2, 3] and rejected.tolist() == [2, 1, 0]


def test_dpo_rewards_loss_and_metrics_by_hand() -> None:
    scored = pair_losses(POLICY, REFERENCE, DATA, DPO)
    # beta * (policy - reference): chosen 0.1, 0.05, 0; rejected -0.1, -0.1, 0.
    assert scored.chosen_rewards.tolist() == pytest.approx([0.1, 0.05, 0.0])
    assert scored.rejected_rewards.tolist() == pytest.approx([-0.1, -0.1, 0.0])
    losses = [math.log1p(math.exp(-m)) for m in (0.2, 0.15, 0.0)]
    metrics = reward_metrics(scored, DATA)
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / 3)
    assert metrics["win_rate"] == pytest.approx((1 + 1 + 0.5) / 3)  # the tie counts one half
    assert metrics["rewards/margins"] == pytest.approx(0.35 / 3)
    assert metrics["pairs"] == 3
    rows = margin_histogram(scored, bins=3)
    assert sum(r["pairs"] for r in rows) == 3


def test_the_reference_against_itself_scores_one_half() -> None:
    metrics = reward_metrics(pair_losses(REFERENCE, REFERENCE, DATA, DPO), DATA)
    assert metrics["win_rate"] == 0.5 and metrics["eval_loss"] == pytest.approx(math.log(2))


def test_reference_free_simpo_rewards_are_per_token_policy_log_probs() -> None:
    simpo = loss_params(variant="simpo", beta=2.0, gamma=0.5, reference_free=True)
    scored = pair_losses(POLICY, REFERENCE, DATA, simpo)  # the reference is not read
    chosen = [2.0 * -8 / 4, 2.0 * -3 / 2, 2.0 * -6 / 3]
    rejected = [2.0 * -7 / 2, 2.0 * -4 / 1, 2.0 * -5 / 1]  # 0 tokens count as 1
    assert scored.chosen_rewards.tolist() == pytest.approx(chosen)
    assert scored.rejected_rewards.tolist() == pytest.approx(rejected)
    expected = [math.log1p(math.exp(-(c - r - 0.5))) for c, r in zip(chosen, rejected, strict=True)]
    assert scored.losses.tolist() == pytest.approx(expected)


def test_ipo_evaluates_length_normalised_margins() -> None:
    ipo = loss_params(variant="ipo")
    scored = pair_losses(POLICY, REFERENCE, DATA, ipo)
    h_avg = [1 / 4 - (-1) / 2, 0.5 / 2 - (-1) / 1, 0.0 - 0.0]
    assert scored.losses.tolist() == pytest.approx([(h - 5.0) ** 2 for h in h_avg])
