"""`python -m pipeline.tune`: Optuna proposes the next experiment, DVC runs it.

The search is declared in `tune.yaml` (the keys, their ranges, the objective metric, the number
of trials, the sampler's seed). Each trial is exactly what a user would type: `dvc exp run --temp
-S key=value ... -n <study>-<number>` (with `--demo`: `python -m demo -S ...`), so it
is one DVC experiment, one MLflow run and one registry version through the normal DAG; its
objective is read from that experiment's metrics. The study lives in Optuna's RDB storage:
SQLite beside the MLflow store by default, or the URL in OPTUNA_STORAGE (PostgreSQL for a team),
so the same command on another machine adds its workers to the same study. A killed worker's
trial is marked FAIL once its heartbeat is older than the grace period, and the study resumes
where it stopped. At the end: the best trial, the commands that reproduce it, and plots in
reports/tune/<study>/, also logged to a parent MLflow run that lists the trial runs as children.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.stage_io import Interrupted, StageError, repo_root, run_stage
from pipeline.stopping import default_stop_signals
from pipeline.strict_yaml import flatten

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
# A running trial's heartbeat, and how many may be missed before the trial is marked FAIL.
HEARTBEAT_SECONDS, GRACE_BEATS = 30, 4


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


def trial_command(
    values: dict[str, float], name: str, demo: bool, fixed: tuple[str, ...] = ()
) -> list[str]:
    """The command a user would type for this trial: the fixed settings, then the trial's."""
    flags = [arg for item in fixed for arg in ("-S", item)]
    flags += [arg for key, value in values.items() for arg in ("-S", f"{key}={value:.6g}")]
    if demo:
        return [sys.executable, "-m", "demo", *flags, "--name", name]
    return [sys.executable, "-m", "dvc", "exp", "run", "--temp", *flags, "-n", name]


def experiment_metrics(name: str) -> dict[str, float]:
    """The metrics an experiment's commit holds, from every file METRICS names."""
    from pipeline.report import read_at

    found: dict[str, float] = {}
    for path in sorted(set(METRICS.values())):
        text = read_at(name, path)
        found.update(json.loads(text) if text else {})
    return found


class TrialFailed(Exception):
    """A trial's experiment failed or wrote no objective; its log says why."""


class TrialStopped(TrialFailed):
    """The search was told to stop while the trial ran: the same command resumes it."""


# The trials' commands now running (one per worker thread), and whether the search was told to
# stop: a stop is passed on to each trial as SIGINT, so its stage keeps its checkpoint.
RUNNING: set[subprocess.Popen] = set()
STOPPING = threading.Event()


def stop_trials(signum: int, frame: Any) -> None:
    """Signal handler: no new trial starts, and every running one is stopped as by Ctrl-C."""
    STOPPING.set()
    for child in list(RUNNING):
        try:
            os.killpg(child.pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def run_experiment(
    values: dict[str, float], name: str, demo: bool, fixed: tuple[str, ...], log: Path
) -> dict[str, float]:
    """Run the trial's experiment (output to `log`, in a process group of its own with the
    stop signals at their defaults) and return its metrics."""
    if STOPPING.is_set():
        raise TrialStopped(f"{name}: not started, the search is stopping")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        child = subprocess.Popen(
            trial_command(values, name, demo, fixed),
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=default_stop_signals,
        )
        RUNNING.add(child)
        try:
            status = child.wait()
        finally:
            RUNNING.discard(child)
    if STOPPING.is_set():
        raise TrialStopped(f"{name} stopped (exit {status}): see {log}")
    if status != 0:
        raise TrialFailed(f"{name} failed (exit {status}): see {log}")
    return experiment_metrics(name)


Runner = Callable[[dict[str, float], str], dict[str, float]]


def value_of(spec: Spec, metrics: dict[str, float]) -> float:
    """The number Optuna optimises: the objective, nudged by the tie-break (lower is better)."""
    if not math.isfinite(metrics.get(spec.objective, math.nan)):
        raise TrialFailed(f"no {spec.objective} in the experiment's metrics")
    value = float(metrics[spec.objective])
    if spec.tie_break and math.isfinite(metrics.get(spec.tie_break, math.nan)):
        sign = 1 if spec.direction == "maximize" else -1
        value -= sign * TIE_WEIGHT * min(float(metrics[spec.tie_break]), 10.0)
    return value


def default_storage() -> str:
    return os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{repo_root() / 'optuna.db'}"


def open_study(
    study: str,
    storage_url: str,
    spec: Spec,
    heartbeat: tuple[int, int] = (HEARTBEAT_SECONDS, GRACE_BEATS * HEARTBEAT_SECONDS),
) -> Any:
    """The named study in the RDB storage (created on first use). A running trial beats every
    heartbeat[0] seconds; one silent for heartbeat[1] (its worker was killed) is marked FAIL when
    a worker next starts a trial."""
    import optuna

    # Heartbeats are marked experimental in Optuna; they are what makes a killed worker's trial
    # end, so the warning says nothing a user can act on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar counts; failures warn
    storage = optuna.storages.RDBStorage(
        storage_url, heartbeat_interval=heartbeat[0], grace_period=heartbeat[1]
    )
    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    return optuna.create_study(
        study_name=study,
        storage=storage,
        sampler=sampler,
        direction=spec.direction,
        load_if_exists=True,
    )


def keep_fixed(study: Any, fixed: tuple[str, ...]) -> None:
    """Record the study's fixed settings on first use; refuse a run that gives other ones (its
    trials would not be comparable with the study's)."""
    recorded = study.user_attrs.get("fixed")
    if recorded is None:
        study.set_user_attr("fixed", list(fixed))
    elif tuple(recorded) != fixed:
        said = " ".join(f"-S {item}" for item in recorded) or "no -S"
        raise TuneError(
            f"study {study.study_name!r} runs its trials with {said}: give the same, "
            "or name a new --study"
        )


def run_study(study: Any, spec: Spec, runner: Runner, workers: int) -> None:
    """Trials until the study holds spec.n_trials complete ones (over every worker and machine),
    `workers` at a time in this process, with a progress bar over the study's trials."""
    import optuna
    from tqdm import tqdm

    complete, failed = (optuna.trial.TrialState.COMPLETE,), (optuna.trial.TrialState.FAIL,)
    done = len(study.get_trials(deepcopy=False, states=complete))
    bar = tqdm(total=spec.n_trials, initial=min(done, spec.n_trials), desc=study.study_name)

    lock = threading.Lock()

    def objective(trial: Any) -> float:
        # Each trial draws from its own stream, seeded by its number: one worker proposes what
        # the same seed proposed before, and workers on any machine never propose the same values
        # (one seeded sampler per process would: every process would draw the same numbers).
        with lock:
            study.sampler = optuna.samplers.TPESampler(seed=spec.seed + trial.number)
            values = {
                d.key: trial.suggest_float(d.key, d.low, d.high, log=d.log) for d in spec.space
            }
        name = f"{study.study_name}-{trial.number}"
        trial.set_user_attr("experiment", name)
        try:
            metrics = runner(values, name)
        except TrialStopped as stopped:  # proposed again first: the same command resumes it
            study.enqueue_trial(values)
            raise optuna.TrialPruned(str(stopped)) from None  # ended early, not failed
        trial.set_user_attr("metrics", metrics)
        return value_of(spec, metrics)

    def progress(study_: Any, _: Any) -> None:
        bar.n = min(len(study_.get_trials(deepcopy=False, states=complete)), spec.n_trials)
        bar.refresh()
        if len(study_.get_trials(deepcopy=False, states=failed)) >= spec.n_trials:
            study_.stop()  # as many failures as trials wanted: something else is wrong
        if STOPPING.is_set():
            study_.stop()

    if done < spec.n_trials:
        study.optimize(
            objective,
            n_jobs=workers,
            catch=(TrialFailed,),
            callbacks=[optuna.study.MaxTrialsCallback(spec.n_trials, states=complete), progress],
        )
    bar.close()


def best_summary(study: Any, spec: Spec, demo: bool) -> list[str]:
    """What a user reads at the end: the best trial and how to get it back."""
    best = study.best_trial
    name, metrics = best.user_attrs["experiment"], best.user_attrs.get("metrics", {})
    figures = ", ".join(
        f"{m} {metrics[m]:.4f}" for m in (spec.objective, spec.tie_break) if m and m in metrics
    )
    fixed = [f"-S {item}" for item in study.user_attrs.get("fixed", [])]
    values = " ".join([*fixed, *(f"-S {k}={v:.6g}" for k, v in best.params.items())])
    again = "python -m demo" if demo else "dvc exp run"
    return [
        f"best: trial {best.number} ({name}): {figures}; "
        + ", ".join(f"{k} {v:.4g}" for k, v in best.params.items()),
        f"its results in the workspace:  dvc exp apply {name}",
        f"run it again:                  {again} {values}",
    ]


def write_plots(study: Any, spec: Spec, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances and (for two or more keys) the contour of the
    first two keys, as PNG files in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    keys = [d.key for d in spec.space]
    drawings = {"history": lambda: plots.plot_optimization_history(study)}
    if len(keys) > 1:
        drawings["importances"] = lambda: plots.plot_param_importances(study)
        drawings["contour"] = lambda: plots.plot_contour(study, params=keys[:2])
    written = []
    for name, draw in drawings.items():
        axes = draw()
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
        written.append(folder / f"{name}.png")
    return written


def log_parent_run(study: Any, spec: Spec, plots: list[Path]) -> str:
    """One MLflow run for the study, named tune-<study>, with the best figures and the plots;
    each trial's training run becomes its child (the `mlflow.parentRunId` tag)."""
    import mlflow

    from pipeline.track.runs import configure, experiment_id

    configure()
    client = mlflow.MlflowClient()
    experiment = experiment_id("qwen3-dpo")
    tag = f"tags.tune_study = '{study.study_name}'"
    found = client.search_runs([experiment], filter_string=f"{tag} and tags.tune_parent = 'true'")
    parent = (
        found[0].info.run_id
        if found
        else client.create_run(
            experiment,
            run_name=f"tune-{study.study_name}",
            tags={"tune_study": study.study_name, "tune_parent": "true"},
        ).info.run_id
    )
    for trial in study.get_trials(deepcopy=False):
        name = trial.user_attrs.get("experiment")
        runs = client.search_runs([experiment], filter_string=f"tags.dvc_exp_name = '{name}'")
        for child in runs if name else []:
            client.set_tag(child.info.run_id, "mlflow.parentRunId", parent)
            client.set_tag(child.info.run_id, "tune_study", study.study_name)
    best = study.best_trial
    for key, value in best.params.items():
        client.log_param(parent, f"best.{key}", f"{value:.6g}")
    client.log_metric(parent, f"best_{spec.objective}", best.user_attrs["metrics"][spec.objective])
    for path in plots:
        client.log_artifact(parent, str(path), artifact_path="tune")
    client.set_terminated(parent)  # FINISHED; a resumed study logs to it again
    return parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="tune", help="study name (trials: <study>-<number>)")
    parser.add_argument("--n-trials", type=int, help="complete trials wanted (tune.yaml: n_trials)")
    parser.add_argument("--workers", type=int, default=1, help="trials at once on this machine")
    parser.add_argument("--demo", action="store_true", help="trials on the offline demo")
    parser.add_argument(
        "--storage",
        help="Optuna storage URL (default: OPTUNA_STORAGE or "
        "sqlite:///optuna.db beside the MLflow store)",
    )
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params value for every trial, e.g. train.max_steps=200 to "
        "search on a shorter schedule (repeatable; kept by the study)",
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=HEARTBEAT_SECONDS,
        metavar="SECONDS",
        help="a running trial's heartbeat; one silent for 4 heartbeats (its "
        f"worker died) is marked FAIL (default {HEARTBEAT_SECONDS})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import optuna

    args = parse_args(argv)
    params = flatten(yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")))
    spec = load_spec(SPEC_FILE, params, args.demo)
    if args.n_trials is not None:
        if args.n_trials < 1:
            raise TuneError(f"--n-trials: {args.n_trials} is not a positive whole number")
        spec = dataclasses.replace(spec, n_trials=args.n_trials)
    for flag, number in (("--workers", args.workers), ("--heartbeat", args.heartbeat)):
        if number < 1:
            raise TuneError(f"{flag}: {number} is not a positive whole number")
    fixed = fixed_settings(args.set, params, spec)
    storage = args.storage or default_storage()
    study = open_study(args.study, storage, spec, (args.heartbeat, GRACE_BEATS * args.heartbeat))
    keep_fixed(study, fixed)
    logs = Path("reports") / "tune" / args.study

    def runner(values: dict[str, float], name: str) -> dict[str, float]:
        return run_experiment(values, name, args.demo, fixed, logs / f"{name}.log")

    for stop in (signal.SIGINT, signal.SIGTERM):  # instead of run_stage's: the trials get the stop
        signal.signal(stop, stop_trials)
    run_study(study, spec, runner, args.workers)
    if STOPPING.is_set():
        raise Interrupted("the running trials were stopped; the same command resumes them")
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise TuneError(f"no trial of study {args.study!r} completed: see the logs in {logs}/")
    plots = write_plots(study, spec, logs)
    parent = log_parent_run(study, spec, plots)
    for line in best_summary(study, spec, args.demo):
        print(line)
    print(f"plots: {logs}/  MLflow: run {parent} (tune-{args.study}) and its children")
    print(f"dashboard: optuna-dashboard {storage}")


if __name__ == "__main__":
    run_stage(main)
