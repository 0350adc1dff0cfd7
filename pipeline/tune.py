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

from pipeline.search_space import (
    METRICS,
    SPEC_FILE,
    Spec,
    TrialFailed,
    TuneError,
    fixed_settings,
    load_spec,
    value_of,
)
from pipeline.stage_io import Interrupted, repo_root, require, run_stage
from pipeline.stopping import default_stop_signals
from pipeline.strict_yaml import flatten
from pipeline.tune_results import best_summary, log_parent_run, write_plots

# A running trial's heartbeat, and how many may be missed before the trial is marked FAIL.
HEARTBEAT_SECONDS, GRACE_BEATS = 30, 4


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
    args = parse_args(argv)
    require("optuna", "tune", "python -m pipeline.tune")
    import optuna

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
