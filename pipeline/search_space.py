"""tune.yaml, read and checked: the params keys a study searches and their ranges, the objective
metric and its tie-break, the number of trials, the sampler's seed; the flags every trial gets;
and the value Optuna sees for a finished experiment's metrics."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.stage_io import StageError

SPEC_FILE = Path("tune.yaml")


# Where each objective metric is written (stages evaluate, judge, train).
METRICS = {
    **dict.fromkeys(("win_rate", "eval_loss", "kendall_tau", "pairwise_tau"), "metrics/eval.json"),
    **dict.fromkeys(("gen_win_rate", "gen_win_rate_lc"), "metrics/judge.json"),
    "final_loss": "metrics/train.json",
}


# The tie-break's weight in the value Optuna sees: below a win rate's resolution on a few hundred
# held-out pairs (1/309 on the demo), so it only orders trials whose objective is equal.
TIE_WEIGHT = 1e-4


class TuneError(StageError, ValueError):
    """A tune.yaml problem, named by its key."""


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str  # a params.yaml key, as -S takes it
    low: float
    high: float
    log: bool


@dataclasses.dataclass(frozen=True)
class Spec:
    space: tuple[Dimension, ...]
    objective: str
    direction: str  # "maximize" or "minimize"
    tie_break: str | None  # lower is better
    n_trials: int
    seed: int


def load_spec(path: Path, params: dict[str, Any], demo: bool) -> Spec:
    """tune.yaml (with its `demo:` keys on top when `demo`), checked against params.yaml's keys
    (`params`, flattened). Raises TuneError naming the key at the first problem."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if demo:
        raw = {**raw, **(raw.get("demo") or {})}
    space = tuple(_dimension(key, rng, params) for key, rng in (raw.get("space") or {}).items())
    if not space:
        raise TuneError(f"{path}: space: name at least one params key to search")
    objective, tie_break = raw.get("objective", "win_rate"), raw.get("tie_break")
    for name, metric in (("objective", objective), ("tie_break", tie_break)):
        if metric is not None and metric not in METRICS:
            known = ", ".join(METRICS)
            raise TuneError(f"{path}: {name}: unknown metric {metric!r} (one of: {known})")
    direction = raw.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise TuneError(f"{path}: direction: {direction!r} is neither maximize nor minimize")
    n_trials, seed = raw.get("n_trials", 12), raw.get("seed", 42)
    if not isinstance(n_trials, int) or n_trials < 1:
        raise TuneError(f"{path}: n_trials: {n_trials!r} is not a positive whole number")
    return Spec(space, objective, direction, tie_break, n_trials, int(seed))


def _dimension(key: str, rng: Any, params: dict[str, Any]) -> Dimension:
    where = f"{SPEC_FILE}: space: {key}"
    if key not in params:
        raise TuneError(f"{where}: not a key of params.yaml")
    if not isinstance(rng, dict) or not {"low", "high"} <= set(rng):
        raise TuneError(f"{where}: give a range as {{low: ..., high: ..., log: true|false}}")
    try:
        low, high = float(rng["low"]), float(rng["high"])
    except (TypeError, ValueError):
        raise TuneError(f"{where}: low and high must be numbers") from None
    log = bool(rng.get("log", False))
    if not low < high:
        raise TuneError(f"{where}: low {low:g} is not below high {high:g}")
    if log and low <= 0:
        raise TuneError(f"{where}: a log range must be above 0 (low is {low:g})")
    return Dimension(key, low, high, log)


def fixed_settings(sets: list[str], params: dict[str, Any], spec: Spec) -> tuple[str, ...]:
    """`-S key=value` flags every trial of a study gets (e.g. a shorter schedule to search on),
    checked: a params.yaml key, and not one the search sets. Returned as `key=value` strings."""
    searched = {d.key for d in spec.space}
    for item in sets:
        key, equals, _ = item.partition("=")
        if not equals:
            raise TuneError(f"-S {item}: give key=value")
        if key not in params:
            raise TuneError(f"-S {item}: {key} is not a key of params.yaml")
        if key in searched:
            raise TuneError(f"-S {item}: {key} is searched ({SPEC_FILE} space); it cannot be fixed")
    return tuple(sets)


def value_of(spec: Spec, metrics: dict[str, float]) -> float:
    """The number Optuna optimises: the objective, nudged by the tie-break (lower is better)."""
    if not math.isfinite(metrics.get(spec.objective, math.nan)):
        raise TrialFailed(f"no {spec.objective} in the experiment's metrics")
    value = float(metrics[spec.objective])
    if spec.tie_break and math.isfinite(metrics.get(spec.tie_break, math.nan)):
        sign = 1 if spec.direction == "maximize" else -1
        value -= sign * TIE_WEIGHT * min(float(metrics[spec.tie_break]), 10.0)
    return value


class TrialFailed(Exception):
    """A trial's experiment failed or wrote no objective; its log says why."""
