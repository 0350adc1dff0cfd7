"""A judge that knows when it is blind: the reward model's held-out accuracy with its Wilson
interval, the judge marked unreliable when that interval reaches 0.5, and where it says so."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.judge.trust import (
    accuracy_interval,
    judge_trust,
    reliable,
    unreliable_reason,
    wilson_interval,
)
from pipeline.judge.verdict import HEADLINE, log_to_run
from pipeline.stage_io import StageError
from pipeline.track import runs as tracking

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


@pytest.mark.parametrize(
    ("share", "trials", "low", "high"),
    [
        # 95 % Wilson intervals worked out by hand from the formula, to 4 decimals.
        (0.8, 10, 0.4902, 0.9433),
        (0.0, 10, 0.0, 0.2775),
        (1.0, 10, 0.7225, 1.0),
        (0.5, 10, 0.2366, 0.7634),
        # The reward model of 50 near-identical pairs at 0.24: worse than a coin, surely.
        (0.24, 50, 0.1430, 0.3741),
    ],
)
def test_wilson_interval_by_hand(share: float, trials: int, low: float, high: float) -> None:
    got = wilson_interval(share, trials)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_bounds_solve_the_score_equation() -> None:
    """Its definition: the p where |share - p| = z * sqrt(p (1 - p) / n), on both sides."""
    share, trials = 0.52, 80
    for p in wilson_interval(share, trials):
        assert abs(share - p) == pytest.approx(Z95 * math.sqrt(p * (1 - p) / trials), rel=1e-12)


def test_a_tie_counts_one_half_in_the_share() -> None:
    # 7 right, 2 ties, 1 wrong of 10 pairs: an accuracy of 0.8, the interval of 8 right of 10.
    accuracy = (7 + 0.5 * 2) / 10
    assert wilson_interval(accuracy, 10) == wilson_interval(0.8, 10)


def test_wilson_interval_narrows_with_pairs_and_knows_nothing_of_none() -> None:
    few, many = wilson_interval(0.6, 20), wilson_interval(0.6, 2000)
    assert few[0] < many[0] < 0.6 < many[1] < few[1]
    assert wilson_interval(0.0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("share", "trials", "level"),
    [(1.2, 10, 0.95), (math.nan, 10, 0.95), (0.5, -1, 0.95), (0.5, 10, 1.0)],
)
def test_wilson_interval_refuses_bad_arguments(share: float, trials: int, level: float) -> None:
    with pytest.raises(ValueError, match="wilson_interval"):
        wilson_interval(share, trials, level)


def test_the_reward_stage_reports_the_accuracy_with_its_interval() -> None:
    assert accuracy_interval(0.8, 10) == pytest.approx(
        {"reward_accuracy": 0.8, "reward_accuracy_low": 0.4902, "reward_accuracy_high": 0.9433},
        abs=5e-5,
    )


def test_reliable_only_when_the_whole_interval_is_above_a_coin() -> None:
    assert reliable(0.5001) and not reliable(0.5) and not reliable(0.2)
    # 0.6 on 100 pairs: low 0.502, just reliable; the same accuracy on 20 pairs: low 0.387.
    assert reliable(wilson_interval(0.6, 100)[0])
    assert not reliable(wilson_interval(0.6, 20)[0])


def report(accuracy: float, pairs: int) -> dict:
    """reports/reward.json as the reward stage writes it."""
    return {**accuracy_interval(accuracy, pairs), "heldout_pairs": pairs, "train_pairs": 50}


def test_the_judge_is_reliable_with_a_reward_model_better_than_a_coin() -> None:
    trust = judge_trust(report(0.9385, 309))
    assert trust["judge_reliable"] is True and trust["reward_heldout_pairs"] == 309
    assert trust["reward_accuracy_low"] == pytest.approx(0.9060, abs=5e-5)
    assert unreliable_reason(trust) is None


def test_the_judge_is_unreliable_when_the_interval_includes_a_coin() -> None:
    trust = judge_trust(report(0.52, 80))
    assert trust["judge_reliable"] is False
    assert unreliable_reason(trust) == (
        "judge unreliable: reward model accuracy 0.520 [0.412, 0.626] on 80 pairs includes 0.5"
    )


def test_a_reward_model_below_a_coin_is_named_so() -> None:
    trust = judge_trust(report(0.24, 50))
    assert trust["judge_reliable"] is False
    assert unreliable_reason(trust) == (
        "judge unreliable: reward model accuracy 0.240 [0.143, 0.374] on 50 pairs lies below 0.5"
    )


def test_the_reason_reads_the_registrys_string_tags_too() -> None:
    tags = {k: str(v) for k, v in judge_trust(report(0.52, 80)).items()}
    assert unreliable_reason(tags) == unreliable_reason(judge_trust(report(0.52, 80)))


def test_a_reward_report_from_before_the_interval_is_one_clear_error() -> None:
    with pytest.raises(StageError, match="reward_accuracy_low, reward_accuracy_high.*dvc repro"):
        judge_trust({"reward_accuracy": 0.9, "heldout_pairs": 300})


def figures(accuracy: float, pairs: int) -> dict:
    """The judge stage's figures: the win rate's, then the reward model's."""
    return {
        "gen_win_rate": 0.7,
        "gen_win_rate_low": 0.6,
        "gen_win_rate_high": 0.8,
        "gen_win_rate_lc": 0.65,
        "prompts": 20,
        "samples": 2,
        **judge_trust(report(accuracy, pairs)),
    }


def test_the_judge_stage_line_says_whether_it_can_be_trusted() -> None:
    from pipeline.judge.verdict import verdict_line

    head = (
        "gen_win_rate 0.700 [0.600, 0.800] against the base model over 20 questions x 2 "
        "(length-controlled 0.650"
    )
    assert verdict_line(figures(0.8, 10)) == (
        f"{head}); judge unreliable: reward model accuracy 0.800 [0.490, 0.943] on 10 pairs "
        "includes 0.5"
    )
    assert verdict_line(figures(0.9385, 309)) == (
        f"{head}; reward model accuracy 0.939 [0.906, 0.960] on 309 pairs)"
    )


def test_the_flag_is_a_headline_figure_a_metric_and_a_run_tag(store) -> None:
    assert "judge_reliable" in HEADLINE
    tracking.configure()
    client = MlflowClient()
    samples = pd.DataFrame({"question": ["q"], "policy_answer": ["a"]})
    for accuracy, pairs, flag in ((0.52, 80, "false"), (0.9385, 309, "true")):
        run_id = client.create_run(client.create_experiment(f"e-{flag}")).info.run_id
        log_to_run(run_id, figures(accuracy, pairs), samples)
        data = client.get_run(run_id).data
        assert data.tags["judge_reliable"] == flag
        assert data.metrics["judge/judge_reliable"] == (1.0 if flag == "true" else 0.0)
        assert data.metrics["judge/reward_heldout_pairs"] == pairs
    assert mlflow.active_run() is None


def test_a_reward_model_with_no_held_out_pair_to_measure_on_is_one_clear_error(
    tmp_path: Path,
) -> None:
    """Every held-out pair dropped (identical answers): no accuracy, so no interval either."""
    from pipeline.data.schema import PAIRS_SCHEMA
    from pipeline.judge.build import _measure

    empty = PAIRS_SCHEMA.empty_table()
    with pytest.raises(StageError, match=r"no held-out pair to measure .*\(0 held-out pairs"):
        _measure(None, None, None, empty, None, None, tmp_path)  # nothing is scored
    assert not list(tmp_path.iterdir())  # no input format written beside a model
