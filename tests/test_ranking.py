"""Ranking metrics on crafted rewards, with hand-computed expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate.ranking import KendallResult, kendall_tau, pairwise_tau, win_rate

Pairs = tuple[list[str], list[str], list[str], list[float], list[float]]


def all_pairs(question: str, label_order: list[str], reward: dict[str, float]) -> Pairs:
    """Every pair of a question's answers, labelled by `label_order` (best first)."""
    rows: Pairs = ([], [], [], [], [])
    for i, better in enumerate(label_order):
        for worse in label_order[i + 1 :]:
            for column, value in zip(
                rows, (question, better, worse, reward[better], reward[worse]), strict=True
            ):
                column.append(value)
    return rows


def merge(*parts: Pairs) -> Pairs:
    return tuple(sum((list(p[i]) for p in parts), []) for i in range(5))  # type: ignore[return-value]


ORDER = ["a1", "a2", "a3"]  # label scores +2, 0, -2
PERFECT = all_pairs("q-perfect", ORDER, {"a1": 3.0, "a2": 2.0, "a3": 1.0})
REVERSED = all_pairs("q-reversed", ORDER, {"a1": -1.0, "a2": 0.5, "a3": 0.7})
# Rewards tie a1 and a2: of the 3 answer pairs, 2 concordant, 0 discordant, 1 tied in rewards
# only, so tau-b = (2 - 0) / sqrt((3 - 0) * (3 - 1)) = 2 / sqrt(6).
TIED = all_pairs("q-tied", ORDER, {"a1": 0.4, "a2": 0.4, "a3": -0.1})
TWO_ANSWERS = all_pairs("q-two", ["a1", "a2"], {"a1": -5.0, "a2": 5.0})
CONSTANT = all_pairs("q-constant", ORDER, {"a1": 0.0, "a2": 0.0, "a3": 0.0})


# ---------------------------------------------------------------- win rate and pairwise tau


def test_win_rate_counts_ties_as_half() -> None:
    assert win_rate([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 1.0]) == pytest.approx(0.625)


def test_win_rate_is_exactly_half_when_all_rewards_are_zero() -> None:
    assert win_rate(np.zeros(7), np.zeros(7)) == 0.5


def test_win_rate_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        win_rate(np.array([]), np.array([]))
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        win_rate([1.0, float("nan")], [0.0, 0.0])


def test_pairwise_tau_is_mean_sign_and_two_win_rate_minus_one() -> None:
    chosen, rejected = [1.0, 0.0, 2.0, 5.0, -1.0], [0.0, 0.0, 3.0, 1.0, -0.5]
    assert pairwise_tau(chosen, rejected) == pytest.approx((1 + 0 - 1 + 1 - 1) / 5)
    assert pairwise_tau(chosen, rejected) == pytest.approx(2 * win_rate(chosen, rejected) - 1)
    assert pairwise_tau(np.zeros(3), np.zeros(3)) == 0.0


# ---------------------------------------------------------------- Kendall's tau


def test_kendall_perfect_and_reversed_rankings() -> None:
    assert kendall_tau(*PERFECT) == KendallResult(tau=1.0, questions=1)
    assert kendall_tau(*REVERSED) == KendallResult(tau=-1.0, questions=1)


def test_kendall_tau_b_with_tied_rewards_matches_hand_computation() -> None:
    result = kendall_tau(*TIED)
    assert result.questions == 1
    assert result.tau == pytest.approx(2 / math.sqrt(6))  # tau-a would give 2/3


def test_kendall_excludes_questions_with_two_answers_or_constant_rankings() -> None:
    assert kendall_tau(*merge(PERFECT, TWO_ANSWERS)) == KendallResult(tau=1.0, questions=1)
    assert kendall_tau(*merge(REVERSED, CONSTANT)) == KendallResult(tau=-1.0, questions=1)
    empty = kendall_tau(*merge(TWO_ANSWERS, CONSTANT))
    assert math.isnan(empty.tau) and empty.questions == 0


def test_kendall_label_score_is_wins_minus_losses_not_pair_order() -> None:
    # 4 answers, only some pairs labelled: b1 beats b2 and b3, b2 beats b3, b4 loses to b3.
    # Scores: b1 +2, b2 0, b3 +1 - 2 = -1, b4 -1 (tied with b3 in labels).
    rewards = {"b1": 4.0, "b2": 3.0, "b3": 2.0, "b4": 1.0}
    pairs = [("b1", "b2"), ("b1", "b3"), ("b2", "b3"), ("b3", "b4")]
    result = kendall_tau(
        ["q"] * 4,
        [w for w, _ in pairs],
        [loser for _, loser in pairs],
        [rewards[w] for w, _ in pairs],
        [rewards[loser] for _, loser in pairs],
    )
    # 6 answer pairs: 5 concordant, 1 tied in labels only (b3, b4): 5 / sqrt(6 * 5).
    assert result == KendallResult(tau=pytest.approx(5 / math.sqrt(30)), questions=1)


def test_kendall_averages_rewards_of_answers_in_several_pairs() -> None:
    # a2 appears twice with rewards 1.5 and -0.5: the mean 0.5 ranks a1 > a2 > a3 as labelled.
    # Keeping either single value instead would give tau 1/3.
    question, chosen, rejected = ["q"] * 3, ["a1", "a1", "a2"], ["a2", "a3", "a3"]
    result = kendall_tau(question, chosen, rejected, [1.0, 1.0, -0.5], [1.5, 0.0, 0.0])
    assert result == KendallResult(tau=1.0, questions=1)


def test_kendall_mixed_questions_are_averaged() -> None:
    # Every question reuses the answer ids a1..a3: answers are distinct per question.
    data = merge(PERFECT, TWO_ANSWERS, REVERSED, CONSTANT, TIED)
    result = kendall_tau(*(np.asarray(column) for column in data))
    assert result.questions == 3
    assert result.tau == pytest.approx((1.0 - 1.0 + 2 / math.sqrt(6)) / 3)


def test_kendall_accepts_integer_ids() -> None:
    result = kendall_tau([7, 7, 7], [1, 1, 2], [2, 3, 3], [3.0, 3.0, 2.0], [2.0, 1.0, 1.0])
    assert result == KendallResult(tau=1.0, questions=1)
