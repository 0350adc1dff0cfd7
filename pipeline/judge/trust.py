"""Whether the judge can be trusted: the reward model's held-out pair accuracy with its 95 %
Wilson score interval, and the rule that marks the judge's figures unreliable.

A reward model that cannot be told from a coin on the held-out pairs (the interval's lower end at
or below 0.5) ranks answers no better than chance, so a generation win rate it gives says nothing
about the policy. The figures are still written; they are marked `judge_reliable: false`, and the
champion gate that reads them (register.gate: gen_win_rate) refuses to decide on them.

The reward, judge and register stages all depend on this file (a change here re-runs them all),
so it holds nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

from pipeline.stage_io import StageError

COIN = 0.5  # the pair accuracy of a reward model that guesses
LEVEL = 0.95  # coverage of the accuracy's interval


def wilson_interval(share: float, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion observed as `share` over `trials` independent trials.

    With z the normal quantile of (1 + level) / 2, p the share and n the trials:
    centre = (p + z^2 / 2n) / (1 + z^2 / n),
    half width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2).

    `share` may count a tie as one half (the reward model's pair accuracy does) and is used as it
    is. A half outcome varies less around its mean than a 0-or-1 one (E[x^2] <= E[x] for x in
    {0, 1/2, 1}), while the formula assumes the variance p (1 - p) of 0-or-1 outcomes: with ties
    the interval is at least as wide as it needs to be, never narrower. No trials: (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"wilson_interval: level must be in (0, 1); got {level}")
    if trials < 0 or not 0.0 <= share <= 1.0:  # also refuses a NaN share
        raise ValueError(
            f"wilson_interval: need 0 <= share <= 1 and trials >= 0; got {share}, {trials}"
        )
    if trials == 0:
        return 0.0, 1.0  # nothing observed: any accuracy is possible
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    spread = z * z / trials
    centre = (share + spread / 2.0) / (1.0 + spread)
    half = z / (1.0 + spread) * math.sqrt(share * (1.0 - share) / trials + spread / (4.0 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float, pairs: int) -> dict[str, float]:
    """The reward stage's accuracy figures: the held-out pair accuracy and its 95 % interval."""
    low, high = wilson_interval(accuracy, pairs)
    return {"reward_accuracy": accuracy, "reward_accuracy_low": low, "reward_accuracy_high": high}


def reliable(accuracy_low: float) -> bool:
    """Whether the reward model can be told from a coin: its interval lies wholly above 0.5."""
    return accuracy_low > COIN


def judge_trust(reward_report: Mapping[str, Any]) -> dict[str, Any]:
    """The judge's figures about its own reward model, from the reward stage's report:
    the accuracy, its interval, the held-out pairs it counts and whether the judge is reliable."""
    missing = [k for k in ("reward_accuracy_low", "reward_accuracy_high") if k not in reward_report]
    if missing:
        raise StageError(
            f"reports/reward.json: no {', '.join(missing)} (written before the accuracy had an "
            "interval); run the reward stage again: dvc repro reward"
        )
    low = float(reward_report["reward_accuracy_low"])
    return {
        "reward_accuracy": float(reward_report["reward_accuracy"]),
        "reward_accuracy_low": low,
        "reward_accuracy_high": float(reward_report["reward_accuracy_high"]),
        "reward_heldout_pairs": int(reward_report["heldout_pairs"]),
        "judge_reliable": reliable(low),
    }


def reward_model_phrase(figures: Mapping[str, Any]) -> str:
    """'reward model accuracy 0.913 [0.877, 0.940] on 300 pairs', from `judge_trust`'s keys
    (plain values or the registry's string tags)."""
    return (
        f"reward model accuracy {float(figures['reward_accuracy']):.3f} "
        f"[{float(figures['reward_accuracy_low']):.3f}, "
        f"{float(figures['reward_accuracy_high']):.3f}] "
        f"on {int(figures['reward_heldout_pairs'])} pairs"
    )


def unreliable_reason(figures: Mapping[str, Any]) -> str | None:
    """'judge unreliable: <why>' when the reward model cannot be told from a coin, else None."""
    low, high = float(figures["reward_accuracy_low"]), float(figures["reward_accuracy_high"])
    if reliable(low):
        return None
    # An interval wholly below 0.5 is a reward model that prefers the rejected answers.
    where = f"includes {COIN}" if high >= COIN else f"lies below {COIN}"
    return f"judge unreliable: {reward_model_phrase(figures)} {where}"
