"""Judge figures on small hand-made arrays, and the length-controlled fit against scipy."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from pipeline.judge.statistics import (
    LC_RIDGE,
    Answers,
    bootstrap_interval,
    judge_figures,
    length_controlled_win_rate,
    repetition_loop,
    wins,
)

# --- wins ---------------------------------------------------------------------------------


def test_wins_by_hand() -> None:
    policy = np.array([[2.0, 1.0, 0.0], [1.0, 1.0, 3.0]])
    base = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    # 2>1 win, 1=1 tie, 0<1 loss; 1=1 tie, 1<2 loss, 3=3 tie
    expected = np.array([[1.0, 0.5, 0.0], [0.5, 0.0, 0.5]])
    np.testing.assert_array_equal(wins(policy, base), expected)


def test_wins_ties_count_half() -> None:
    scores = np.array([[0.3, -1.0], [2.0, 7.5]])
    np.testing.assert_array_equal(wins(scores, scores.copy()), np.full((2, 2), 0.5))
    # One exact tie among four pairs the policy otherwise loses: mean 0.5 / 4.
    assert wins(np.array([[1.0, 0.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 1.0, 1.0]])).mean() == 0.125


def test_wins_bad_shapes_name_both() -> None:
    with pytest.raises(ValueError, match=re.escape("(2, 3)") + ".*" + re.escape("(3, 2)")):
        wins(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=re.escape("(4,)")):
        wins(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        wins(np.array([[np.nan]]), np.array([[0.0]]))


# --- bootstrap_interval -------------------------------------------------------------------


def test_bootstrap_single_prompt_is_its_mean() -> None:
    assert bootstrap_interval(np.array([[1.0, 0.0, 1.0, 1.0]])) == (0.75, 0.75)


def test_bootstrap_two_opposite_prompts_by_hand() -> None:
    # Replicate means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: both 2.5 % tails sit
    # inside the point masses at 0 and 1.
    assert bootstrap_interval(np.array([[0.0, 0.0], [1.0, 1.0]])) == (0.0, 1.0)


def test_bootstrap_resamples_prompts_not_samples() -> None:
    # Every prompt has mean 0.5: any draw of prompts has mean 0.5. Drawing pairs instead would
    # give replicates spread around 0.5.
    assert bootstrap_interval(np.tile([1.0, 0.0], (30, 1))) == (0.5, 0.5)
    # When a prompt's samples agree, more samples add no information: the interval is the one
    # of the per-prompt means.
    per_prompt = np.random.default_rng(1).integers(0, 2, 25).astype(float)
    wide = np.repeat(per_prompt[:, None], 8, axis=1)
    assert bootstrap_interval(wide, seed=3) == bootstrap_interval(per_prompt[:, None], seed=3)


def test_bootstrap_contains_mean_and_is_seeded() -> None:
    outcomes = np.random.default_rng(2).choice([0.0, 0.5, 1.0], size=(40, 4))
    low, high = bootstrap_interval(outcomes, seed=7)
    assert low < outcomes.mean() < high
    assert bootstrap_interval(outcomes, seed=7) == (low, high)
    assert bootstrap_interval(outcomes, seed=8) != (low, high)


def test_bootstrap_matches_normal_width_and_narrows_with_prompts() -> None:
    # Per-prompt means half 0, half 1: sd 0.5, so the 95 % half-width is about
    # 1.96 * 0.5 / sqrt(P): 0.049 for P = 400, and four times the prompts halve it.
    small = np.repeat([[0.0], [1.0]], 200, axis=0)
    low, high = bootstrap_interval(small)
    assert (high - low) / 2 == pytest.approx(1.96 * 0.5 / 20, rel=0.15)
    big_low, big_high = bootstrap_interval(np.tile(small, (4, 1)))
    assert (big_high - big_low) == pytest.approx((high - low) / 2, rel=0.2)


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=re.escape("(3,)")):
        bootstrap_interval(np.zeros(3))
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(np.zeros((3, 2)), level=1.0)


# --- length_controlled_win_rate -----------------------------------------------------------


def scipy_lc(outcomes: np.ndarray, policy_len: np.ndarray, base_len: np.ndarray) -> float:
    """sigmoid(a) of the same penalised logistic fit, by Nelder-Mead on a separate NLL."""
    y = outcomes.ravel()
    d = (policy_len - base_len).ravel().astype(float)
    z = d / np.sqrt(np.mean((d - d.mean()) ** 2))

    def nll(theta: np.ndarray) -> float:
        t = theta[0] + theta[1] * z
        return -np.sum(y * log_expit(t) + (1 - y) * log_expit(-t)) + LC_RIDGE / 2 * theta[1] ** 2

    fit = minimize(
        nll,
        np.zeros(2),
        method="Nelder-Mead",
        options={"xatol": 1e-11, "fatol": 1e-15, "maxiter": 20_000, "maxfev": 40_000},
    )
    assert fit.success
    return float(expit(fit.x[0]))


def test_lc_matches_independent_fit() -> None:
    rng = np.random.default_rng(5)
    policy_len = rng.integers(50, 400, (30, 4))
    base_len = rng.integers(50, 300, (30, 4))
    # Longer answers win more often; ties (0.5) are soft labels.
    p_win = expit((policy_len - base_len) / 80 + 0.3)
    outcomes = np.where(rng.random((30, 4)) < p_win, 1.0, 0.0)
    outcomes[rng.random((30, 4)) < 0.1] = 0.5
    lc = length_controlled_win_rate(outcomes, policy_len, base_len)
    assert lc == pytest.approx(scipy_lc(outcomes, policy_len, base_len), abs=1e-6)
    assert lc < outcomes.mean()


def test_lc_separable_data_stays_finite_and_matches_independent_fit() -> None:
    # The policy wins exactly when it is longer: without the ridge the slope would diverge.
    d = np.array([[-40, -10, 5, 25], [-5, 15, 30, 60]])
    outcomes = (d > 0).astype(float)
    base_len = np.full(d.shape, 100)
    lc = length_controlled_win_rate(outcomes, base_len + d, base_len)
    assert 0.0 < lc < 1.0
    assert lc == pytest.approx(scipy_lc(outcomes, base_len + d, base_len), abs=1e-6)


def test_lc_equals_raw_rate_when_wins_do_not_depend_on_length() -> None:
    # Every length difference sees the same outcomes (1, 1, 0, 0.5): the likelihood is at its
    # maximum with slope 0, where sigmoid(a) is the mean, 0.625.
    d = np.repeat([[-30], [0], [10], [50]], 4, axis=1)
    outcomes = np.tile([1.0, 1.0, 0.0, 0.5], (4, 1))
    lc = length_controlled_win_rate(outcomes, 200 + d, np.full(d.shape, 200))
    assert lc == pytest.approx(0.625, abs=1e-9)


def test_lc_removes_a_win_rate_bought_with_length() -> None:
    # 9 prompts where the policy is 20 tokens longer and wins 3 of 4, 1 where it is 20 tokens
    # shorter and wins 1 of 4: raw 0.7. z is +-c (not centred), and two length levels make the
    # fit exact, a + b c = log 3 = -(a - b c), so a = 0: 0.5 at equal length (the ridge moves it
    # by a few 1e-4).
    outcomes = np.array([[1.0, 1.0, 1.0, 0.0]] * 9 + [[1.0, 0.0, 0.0, 0.0]])
    policy_len = np.array([[120] * 4] * 9 + [[80] * 4])
    base_len = np.full((10, 4), 100)
    assert outcomes.mean() == pytest.approx(0.7)
    lc = length_controlled_win_rate(outcomes, policy_len, base_len)
    assert lc == pytest.approx(0.5, abs=1e-3)
    # Standardising makes the unit of length irrelevant.
    assert length_controlled_win_rate(outcomes, 3 * policy_len, 3 * base_len) == pytest.approx(
        lc, abs=1e-12
    )


def test_lc_degenerate_cases_return_the_plain_mean() -> None:
    outcomes = np.array([[1.0, 0.0, 0.5], [1.0, 1.0, 0.0]])
    base_len = np.array([[10, 20, 30], [40, 50, 60]])
    # Every difference equal: no length term to separate from the intercept.
    assert length_controlled_win_rate(outcomes, base_len + 7, base_len) == pytest.approx(3.5 / 6)
    assert length_controlled_win_rate(outcomes, base_len, base_len) == pytest.approx(3.5 / 6)
    # Always winning: the intercept has no finite maximum; its limit is a win rate of 1.
    always = np.ones((2, 3))
    assert length_controlled_win_rate(always, base_len[::-1], base_len) == 1.0


def test_lc_bad_shapes_name_them() -> None:
    with pytest.raises(ValueError, match=re.escape("(2, 3)") + ".*" + re.escape("(3, 2)")):
        length_controlled_win_rate(np.zeros((2, 3)), np.zeros((3, 2)), np.zeros((3, 2)))


# --- repetition_loop ----------------------------------------------------------------------


def test_loop_period_one() -> None:
    assert repetition_loop([7] * 12)  # 12 = unit * repeats equal tokens
    assert not repetition_loop([7] * 11)
    assert not repetition_loop([7, 7, 7])  # "a a a": three copies, but of a 1-token block
    broken = [7] * 13
    broken[6] = 8  # runs of 6 on either side
    assert not repetition_loop(broken)


def test_loop_period_two_and_four() -> None:
    assert repetition_loop([1, 2] * 6)
    assert not repetition_loop([1, 2] * 5 + [1])
    noise = [90, 91, 92]
    assert repetition_loop(noise + [1, 2, 3, 4] * 3 + noise)
    assert not repetition_loop(noise + [1, 2, 3, 4] * 2 + [1, 2, 3] + noise)
    assert not repetition_loop([1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4])  # one token differs


def test_loop_short_block_must_fill_unit_times_repeats() -> None:
    assert repetition_loop([1, 2, 3] * 4)  # period 3 over 12 tokens
    assert not repetition_loop([1, 2, 3] * 3 + [1, 2])  # 11 tokens
    assert not repetition_loop([1, 2, 3] * 4, max_period=2)


def test_loop_period_seven() -> None:
    block = [10, 11, 12, 13, 14, 15, 16]
    assert repetition_loop([1, 2] + block * 3 + [3])
    assert not repetition_loop((block * 3)[:-1])  # 20 tokens: the third copy is cut short
    assert not repetition_loop(block * 3, max_period=6)
    assert repetition_loop(block * 2, repeats=2)


def test_loop_none_and_empty() -> None:
    assert not repetition_loop([])
    assert not repetition_loop([5])
    assert not repetition_loop(list(range(200)))
    with pytest.raises(ValueError, match="repeats"):
        repetition_loop([1, 1], repeats=1)


# --- judge_figures ------------------------------------------------------------------------


def hand_made() -> dict[str, Any]:
    return {
        "policy": Answers(
            scores=np.array([[2.0, 0.0], [1.0, 1.0]]),
            lengths=np.array([[10, 20], [30, 40]]),
            hit_max=np.array([[True, False], [False, False]]),
            loops=np.array([[False, False], [True, True]]),
        ),
        "base": Answers(
            scores=np.array([[1.0, 1.0], [1.0, 0.0]]),  # wins: 1, 0, 0.5, 1
            lengths=np.array([[10, 10], [10, 10]]),
            hit_max=np.zeros((2, 2), dtype=bool),
            loops=np.array([[True, False], [False, False]]),
        ),
        "chosen_scores": np.array([3.0, 5.0]),
        "chosen_lengths": np.array([7, 9]),
    }


def test_judge_figures_by_hand() -> None:
    arrays = hand_made()
    figures = judge_figures(**arrays)
    low, high, lc = (
        figures.pop(k) for k in ("gen_win_rate_low", "gen_win_rate_high", "gen_win_rate_lc")
    )
    assert figures == {
        "gen_win_rate": 0.625,
        "reward_policy": 1.0,
        "reward_base": 0.75,
        "reward_chosen": 4.0,
        "length_policy": 25.0,
        "length_base": 10.0,
        "length_chosen": 8.0,
        "max_tokens_share_policy": 0.25,
        "max_tokens_share_base": 0.0,
        "loop_share_policy": 0.5,
        "loop_share_base": 0.25,
        "prompts": 2,
        "samples": 2,
    }
    # Prompt means 0.5 and 0.75: replicates 0.5, 0.625, 0.75.
    assert (low, high) == (0.5, 0.75)
    policy, base = arrays["policy"], arrays["base"]
    w = wins(policy.scores, base.scores)
    assert lc == length_controlled_win_rate(w, policy.lengths, base.lengths)


def test_judge_figures_are_plain_json_numbers() -> None:
    figures = judge_figures(**hand_made())
    assert all(type(v) in (float, int) for v in figures.values())
    assert json.loads(json.dumps(figures)) == figures


def test_judge_figures_bad_shapes_name_them() -> None:
    arrays = hand_made()
    arrays["chosen_scores"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"chosen_scores.*\(2,\).*\(2, 2\)"):
        judge_figures(**arrays)
    arrays = hand_made()
    arrays["policy"] = dataclasses.replace(arrays["policy"], loops=np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"policy\.loops.*\(2, 2\).*\(2, 3\)"):
        judge_figures(**arrays)
    arrays = hand_made()
    arrays["base"] = dataclasses.replace(arrays["base"], lengths=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=re.escape("(2, 2)") + ".*" + re.escape("(3, 2)")):
        judge_figures(**arrays)
