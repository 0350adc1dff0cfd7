"""Ranking metrics over per-pair implicit rewards: numpy in, plain floats out.

Each pair i has a chosen (preferred) answer with implicit reward r_w[i] and a rejected one with
r_l[i], where r(y) = beta * (logp_policy(y|x) - logp_reference(y|x)). Definitions:
docs/objective.md, "Metrics".
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
from numpy.typing import ArrayLike


@dataclasses.dataclass(frozen=True)
class KendallResult:
    tau: float  # mean per-question tau-b; nan when no question qualifies
    questions: int  # how many questions the mean is over


def _pair_rewards(
    chosen_rewards: ArrayLike, rejected_rewards: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to two float64 arrays of shape (N,), N >= 1, all finite.

    Non-finite rewards are an error rather than a silent loss: a NaN compares false both ways and
    would quietly count as a lost pair (empty completions are a known source of NaN rewards).
    """
    chosen = np.asarray(chosen_rewards, dtype=np.float64)
    rejected = np.asarray(rejected_rewards, dtype=np.float64)
    if chosen.ndim != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"expected two 1-D reward arrays of one length; got shapes "
            f"{chosen.shape} and {rejected.shape}"
        )
    if chosen.size == 0:
        raise ValueError("no pairs: ranking metrics are undefined on empty input")
    if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
        raise ValueError("implicit rewards contain NaN or inf")
    return chosen, rejected


def win_rate(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> float:
    """Share of pairs with r_w > r_l, a tie counting one half.

    Args:
        chosen_rewards, rejected_rewards: (N,) implicit rewards of each pair's two answers.

    A policy equal to the reference (every reward 0) scores exactly 0.5. Empty input raises
    ValueError.
    """
    chosen, rejected = _pair_rewards(chosen_rewards, rejected_rewards)
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def pairwise_tau(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> float:
    """Mean over pairs of sign(r_w - r_l), in [-1, 1]; equals 2 * win_rate - 1.

    Args:
        chosen_rewards, rejected_rewards: (N,) implicit rewards of each pair's two answers.
    """
    chosen, rejected = _pair_rewards(chosen_rewards, rejected_rewards)
    return float(np.mean(np.sign(chosen - rejected)))


@dataclasses.dataclass
class _Answer:
    score: int = 0  # wins minus losses over the question's labelled pairs
    rewards: list[float] = dataclasses.field(default_factory=list)  # one per appearance


def _answers_by_question(
    question_ids: Sequence[Hashable],
    chosen_ids: Sequence[Hashable],
    rejected_ids: Sequence[Hashable],
    chosen: np.ndarray,
    rejected: np.ndarray,
) -> dict[Hashable, dict[Hashable, _Answer]]:
    """question -> answer id -> its label score and rewards.

    Answers are keyed within their question: the same answer id under two questions (say, two
    empty answers) is two answers.
    """
    table: dict[Hashable, dict[Hashable, _Answer]] = defaultdict(dict)
    for q, a_w, a_l, r_w, r_l in zip(
        question_ids, chosen_ids, rejected_ids, chosen, rejected, strict=True
    ):
        winner = table[q].setdefault(a_w, _Answer())
        winner.score += 1
        winner.rewards.append(float(r_w))
        loser = table[q].setdefault(a_l, _Answer())
        loser.score -= 1
        loser.rewards.append(float(r_l))
    return table


def _question_tau(answers: dict[Hashable, _Answer]) -> float:
    """Tau-b between reward and label score over one question's answers; nan when it has fewer
    than 3 answers or either ranking is constant (tau undefined)."""
    if len(answers) < 3:
        return math.nan
    scores = np.array([a.score for a in answers.values()], dtype=np.float64)
    # An answer in several pairs should get one reward, but batches padded differently can
    # differ in the last bits under bf16: the mean gives it a single value.
    rewards = np.array([np.mean(a.rewards) for a in answers.values()])
    if np.ptp(scores) == 0 or np.ptp(rewards) == 0:
        return math.nan  # decided here so scipy does not warn about constant input
    from scipy.stats import kendalltau  # here, not at the top: a slow import only this needs

    return float(kendalltau(rewards, scores, variant="b").statistic)


def kendall_tau(
    question_ids: ArrayLike,
    chosen_ids: ArrayLike,
    rejected_ids: ArrayLike,
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
) -> KendallResult:
    """Per-question Kendall tau-b between the reward ranking and the labelled ranking, averaged.

    Args:
        question_ids: (N,) the question of each pair (str or int).
        chosen_ids, rejected_ids: (N,) an id per answer (str or int, e.g. a hash of its token
            ids): equal ids under one question are the same answer.
        chosen_rewards, rejected_rewards: (N,) implicit rewards of each pair's two answers.

    Per question: its distinct answers; each answer's reward (the mean over its appearances);
    its label score = wins minus losses over the question's labelled pairs; tau-b
    (scipy.stats.kendalltau, variant 'b', so ties in either ranking are corrected for) between
    the two. The result averages over questions with at least 3 distinct answers whose tau is
    defined (neither ranking constant) and reports how many those are; tau is nan if none.
    """
    chosen, rejected = _pair_rewards(chosen_rewards, rejected_rewards)
    ids = [np.asarray(a).tolist() for a in (question_ids, chosen_ids, rejected_ids)]
    if any(len(a) != len(chosen) for a in ids):
        raise ValueError("question_ids, chosen_ids and rejected_ids must have one entry per pair")
    table = _answers_by_question(*ids, chosen, rejected)
    taus = [t for t in map(_question_tau, table.values()) if not math.isnan(t)]
    return KendallResult(tau=float(np.mean(taus)) if taus else math.nan, questions=len(taus))
