"""The judge's statistics: a policy's generated answers against the base model's, numpy only.

Every input is indexed (P, S): P held-out prompts, S samples per prompt. Sample s of the policy
and sample s of the base were generated with the same seed, so they form a pair; a reward model
scored every answer. The dataset's human-chosen answer to each prompt, scored the same way, is
the (P,) upper reference.

Definitions:
- win: 1 where the policy's answer scores higher than its paired base answer, 0.5 on an exact
  tie, 0 otherwise; the win rate is the mean over all P * S pairs.
- interval: percentile bootstrap of the win rate that resamples prompts, not pairs.
- length-controlled win rate: the win rate a logistic fit on the length difference predicts
  at equal length (`length_controlled_win_rate`).
- repetition loop: a span that repeats back to back (`repetition_loop`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# L2 penalty on the length slope, on the scale of the log-likelihood summed over pairs: a prior
# worth about a hundredth of one pair. It keeps the slope finite when the length difference
# separates wins from losses exactly and moves an ordinary fit by far less than its noise.
LC_RIDGE = 1e-2
_NEWTON_STEPS = 100
_STEP_TOLERANCE = 1e-12


def _grid(name: str, values: np.ndarray) -> np.ndarray:
    """A finite float64 (P, S) array with P, S >= 1, or a ValueError naming its shape."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty (prompts, samples) array; got {arr.shape}")
    # A NaN compares false both ways and would silently count as a lost pair.
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: NaN or inf in the input")
    return arr


def _same_shape(name: str, *arrays: np.ndarray) -> None:
    """ValueError naming every shape unless all arrays share one."""
    shapes = [np.shape(a) for a in arrays]
    if len(set(shapes)) > 1:
        raise ValueError(
            f"{name}: expected arrays of one shape; got {' and '.join(map(str, shapes))}"
        )


def wins(policy: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per-pair outcome of the policy against the base.

    Args:
        policy, base: (P, S) reward-model scores; sample s of one prompt is a pair.

    Returns:
        (P, S) float64: 1.0 where the policy scores higher, 0.5 on an exact tie, 0.0 otherwise.
    """
    _same_shape("wins", policy, base)
    policy_arr, base_arr = _grid("wins", policy), _grid("wins", base)
    return (policy_arr > base_arr) + 0.5 * (policy_arr == base_arr)


def bootstrap_interval(
    wins: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean win rate, resampling prompts.

    Args:
        wins: (P, S) per-pair outcomes in [0, 1] (see `wins`).
        resamples: bootstrap replicates.
        level: coverage of the two-sided interval, in (0, 1).
        seed: seed of the numpy Generator; one seed always gives one interval.

    The S samples of one prompt answer the same question, so they are not independent draws:
    a replicate draws P prompts (rows) with replacement and keeps all their samples. Every row
    has S samples, so a replicate's mean is the mean of its rows' means. P == 1 gives
    (mean, mean): one prompt says nothing about the spread over prompts.
    """
    outcomes = _grid("bootstrap_interval", wins)
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1; got {resamples}, {level}")
    prompt_means = outcomes.mean(axis=1)
    mean = float(prompt_means.mean())
    if len(prompt_means) == 1:
        return mean, mean
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(prompt_means), size=(resamples, len(prompt_means)))
    replicates = prompt_means[rows].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # no overflow for large |t|, unlike 1 / (1 + exp(-t))


def _penalised_nll(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Negative log-likelihood of soft labels y under sigmoid(x @ theta), plus the slope's L2."""
    t = x @ theta
    # -log sigmoid(t) = logaddexp(0, -t), stable on both tails.
    nll = y @ np.logaddexp(0.0, -t) + (1.0 - y) @ np.logaddexp(0.0, t)
    return float(nll + 0.5 * LC_RIDGE * theta[1] ** 2)


def _fit_logistic(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(a, b) minimising `_penalised_nll` for P(win) = sigmoid(a + b * z); Newton steps.

    The objective is strictly convex (the ridge covers b, and a is bounded when 0 < mean(y) < 1),
    so damped Newton converges to the unique minimum. Halving a step until the objective does
    not rise keeps it from overshooting where the curvature is small (near-separable data).
    """
    x = np.stack([np.ones_like(z), z], axis=1)
    mean = y.mean()
    theta = np.array([np.log(mean / (1.0 - mean)), 0.0])  # the intercept-only maximum
    ridge = np.diag([0.0, LC_RIDGE])
    for _ in range(_NEWTON_STEPS):
        p = _sigmoid(x @ theta)
        gradient = x.T @ (p - y) + ridge @ theta
        hessian = (x * (p * (1.0 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hessian, gradient)
        current = _penalised_nll(theta, x, y)
        scale = 1.0
        while _penalised_nll(theta - scale * step, x, y) > current and scale > 1e-10:
            scale /= 2.0
        theta = theta - scale * step
        if np.abs(scale * step).max() < _STEP_TOLERANCE:
            break
    return theta


def length_controlled_win_rate(
    wins: np.ndarray, policy_length: np.ndarray, base_length: np.ndarray
) -> float:
    """The win rate a logistic fit on the length difference predicts at equal length.

    Args:
        wins: (P, S) per-pair outcomes (ties 0.5, used as soft labels).
        policy_length, base_length: (P, S) answer lengths in tokens.

    With d = policy_length - base_length and z = d / std(d) (population std, not centred, so
    z = 0 is equal length), fits P(win) = sigmoid(a + b * z) by maximum likelihood over all
    P * S pairs, with an L2 penalty LC_RIDGE / 2 * b**2 (none on a) so the slope stays finite
    when length separates wins from losses, and returns sigmoid(a). A win rate that is only
    the reward model's taste for longer answers drops towards 0.5; one that does not depend
    on length is returned unchanged.
    """
    name = "length_controlled_win_rate"
    _same_shape(name, wins, policy_length, base_length)
    y = _grid(name, wins).ravel()
    d = (_grid(name, policy_length) - _grid(name, base_length)).ravel()
    mean = float(y.mean())
    spread = float(d.std())
    # Equal differences everywhere make z a constant: the slope and the intercept cannot be told
    # apart, so there is no "equal length" to predict at. Always winning (or always losing) has
    # no finite intercept; the limit of sigmoid(a) is that same 1 (or 0).
    if spread == 0.0 or mean in (0.0, 1.0):
        return mean
    a, _ = _fit_logistic(y, d / spread)
    return float(_sigmoid(np.asarray(a)))


def _longest_true_run(flags: np.ndarray) -> int:
    """Length of the longest stretch of consecutive True values in a 1-D bool array."""
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int((ends - starts).max()) if len(starts) else 0


def repetition_loop(
    tokens: Sequence[int], *, unit: int = 4, repeats: int = 3, max_period: int = 64
) -> bool:
    """Whether the token sequence contains a span that repeats back to back.

    Definition: True when for some period p in [1, max_period] there is a run tokens[i : i + L]
    with tokens[j] == tokens[j + p] for every j in [i, i + L - p) (the run is one p-token block
    repeated, the last copy possibly cut short) and L >= max(p, unit) * repeats. For p >= unit
    that is `repeats` whole copies of the block in a row; a shorter block must fill at least
    unit * repeats tokens, so with the defaults "a a a" is no loop, but 12 equal tokens are.

    Cost: O(len(tokens) * max_period).
    """
    if unit < 1 or repeats < 2 or max_period < 1:
        raise ValueError(
            f"need unit >= 1, repeats >= 2, max_period >= 1; got {unit}, {repeats}, {max_period}"
        )
    seq = np.asarray(tokens, dtype=np.int64)
    for period in range(1, max_period + 1):
        span = max(period, unit) * repeats
        if span > len(seq):
            break  # the span needed never shrinks as the period grows
        # A run of L tokens with period p is L - p consecutive matches at distance p.
        if _longest_true_run(seq[period:] == seq[:-period]) >= span - period:
            return True
    return False


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values, dtype=np.float64))


def _expect_shape(shape: tuple[int, ...], **arrays: np.ndarray) -> None:
    """ValueError naming the array, its shape and the expected one, for the first that differs."""
    for name, arr in arrays.items():
        if np.shape(arr) != shape:
            raise ValueError(f"{name}: expected shape {shape}; got {np.shape(arr)}")


@dataclasses.dataclass(frozen=True)
class Answers:
    """One model's generated answers, each array (P, S) over prompts and samples."""

    scores: np.ndarray  # the reward model's score of each answer
    lengths: np.ndarray  # its length in tokens
    hit_max: np.ndarray  # bool: it stopped at the token limit
    loops: np.ndarray  # bool: it has a `repetition_loop`


def judge_figures(
    policy: Answers,
    base: Answers,
    chosen_scores: np.ndarray,
    chosen_lengths: np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """All judge figures, as plain (JSON-safe) Python numbers.

    Args:
        policy, base: the two models' answers, (P, S) each.
        chosen_scores, chosen_lengths: (P,) score and length of each prompt's human-chosen
            answer (the upper reference).
        resamples, seed: of the win rate's 95 % `bootstrap_interval`.
    """
    outcomes = wins(policy.scores, base.scores)
    shape = outcomes.shape
    for name, answers in (("policy", policy), ("base", base)):
        _expect_shape(shape, **{f"{name}.{k}": v for k, v in vars(answers).items()})
    _expect_shape(shape[:1], chosen_scores=chosen_scores, chosen_lengths=chosen_lengths)
    low, high = bootstrap_interval(outcomes, resamples=resamples, level=0.95, seed=seed)
    return {
        "gen_win_rate": _mean(outcomes),
        "gen_win_rate_low": low,
        "gen_win_rate_high": high,
        "gen_win_rate_lc": length_controlled_win_rate(outcomes, policy.lengths, base.lengths),
        "reward_policy": _mean(policy.scores),
        "reward_base": _mean(base.scores),
        "reward_chosen": _mean(chosen_scores),
        "length_policy": _mean(policy.lengths),
        "length_base": _mean(base.lengths),
        "length_chosen": _mean(chosen_lengths),
        "max_tokens_share_policy": _mean(policy.hit_max),
        "max_tokens_share_base": _mean(base.hit_max),
        "loop_share_policy": _mean(policy.loops),
        "loop_share_base": _mean(base.loops),
        "prompts": shape[0],
        "samples": shape[1],
    }
