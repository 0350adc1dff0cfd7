"""pipeline.tune: tune.yaml checked before any trial; the study's proposals, workers, storage and
a killed worker, with each trial's experiment replaced by a function of its params (a real
trial is `dvc exp run`, which tests/test_full_dag.py covers)."""

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from pipeline import search_space, tune, tune_results
from tests.helpers import REPO

SPACE = (
    search_space.Dimension("train.lr", 1e-4, 1e-2, True),
    search_space.Dimension("loss.beta", 0.01, 0.5, False),
)
SPEC = search_space.Spec(SPACE, "win_rate", "maximize", "eval_loss", 6, 7)


def bowl(values: dict[str, float], name: str) -> dict[str, float]:
    """A stand-in experiment: win rate peaks at lr 1e-3, beta 0.1."""
    distance = (math.log10(values["train.lr"]) + 3) ** 2 + (values["loss.beta"] - 0.1) ** 2
    return {"win_rate": 1 - distance / 10, "eval_loss": distance}


def broken_spec(tmp_path: Path, change: dict) -> str:
    """`python -m pipeline.tune` with tune.yaml changed: its stderr (it must fail before any
    trial: no study storage is created)."""
    raw = yaml.safe_load((REPO / "tune.yaml").read_text())
    for key, value in change.items():
        if key == "objective":
            raw["objective"] = value
        else:
            raw["space"][key] = value
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPTUNA_STORAGE": f"sqlite:///{tmp_path}/o.db"}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.tune"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and not (tmp_path / "o.db").exists(), done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"train.lrr": {"low": 1e-6, "high": 1e-4}}, "space: train.lrr: not a key of params.yaml"),
        ({"train.lr": {"low": 1e-3, "high": 1e-4}}, "train.lr: low 0.001 is not below high 0.0001"),
        ({"loss.beta": {"low": 0, "high": 0.5, "log": True}}, "a log range must be above 0"),
        ({"objective": "accuracy"}, "objective: unknown metric 'accuracy' (one of: win_rate"),
    ],
    ids=["unknown-key", "low-above-high", "log-from-zero", "unknown-metric"],
)
def test_a_bad_tune_yaml_is_one_error_line_before_any_trial(tmp_path, change, said) -> None:
    line = broken_spec(tmp_path, change)
    assert line.startswith("error: tune.yaml: ") and said in line, line


def test_the_shipped_search_spaces_load() -> None:
    params = tune.flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    real = search_space.load_spec(REPO / "tune.yaml", params, demo=False)
    demo = search_space.load_spec(REPO / "tune.yaml", params, demo=True)
    assert [d.key for d in real.space] == ["train.lr", "loss.beta"] == [d.key for d in demo.space]
    assert real.space[0].high == 1e-4 and demo.space[0].high == 1e-2 and real.n_trials == 12


def test_a_trial_is_the_command_a_user_types() -> None:
    values = {"train.lr": 0.00123456789, "loss.beta": 0.2}
    assert tune.trial_command(values, "s-3", demo=True)[1:] == [
        "-m",
        "demo",
        "-S",
        "train.lr=0.00123457",
        "-S",
        "loss.beta=0.2",
        "--name",
        "s-3",
    ]
    assert tune.trial_command(values, "s-3", demo=False)[1:6] == [
        "-m",
        "dvc",
        "exp",
        "run",
        "--temp",
    ]


def test_fixed_settings_come_first_and_are_checked() -> None:
    params = tune.flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    fixed = search_space.fixed_settings(["train.max_steps=20"], params, SPEC)
    command = tune.trial_command({"train.lr": 0.002}, "s-0", demo=False, fixed=fixed)
    assert command[6:10] == ["-S", "train.max_steps=20", "-S", "train.lr=0.002"]
    for bad, said in (
        ("train.max_step=20", "train.max_step is not a key of params.yaml"),
        ("train.lr=1e-5", "train.lr is searched"),
        ("train.max_steps", "give key=value"),
    ):
        with pytest.raises(search_space.TuneError, match=said):
            search_space.fixed_settings([bad], params, SPEC)


def test_a_study_keeps_its_fixed_settings(tmp_path) -> None:
    study = tune.open_study("f", f"sqlite:///{tmp_path}/o.db", SPEC)
    tune.keep_fixed(study, ("train.max_steps=20",))
    tune.keep_fixed(study, ("train.max_steps=20",))  # the same again: resumed
    with pytest.raises(search_space.TuneError, match="runs its trials with -S train.max_steps=20"):
        tune.keep_fixed(study, ())


def test_the_tie_break_orders_only_equal_objectives() -> None:
    lower_loss = search_space.value_of(SPEC, {"win_rate": 0.75, "eval_loss": 0.4})
    higher_loss = search_space.value_of(SPEC, {"win_rate": 0.75, "eval_loss": 0.9})
    one_pair_more = search_space.value_of(SPEC, {"win_rate": 0.75 + 1 / 309, "eval_loss": 9.0})
    assert higher_loss < lower_loss < one_pair_more
    with pytest.raises(search_space.TrialFailed, match="no win_rate"):
        search_space.value_of(SPEC, {"eval_loss": 0.4})


def test_the_same_seed_and_storage_propose_the_same_trials(tmp_path) -> None:
    proposed = []
    for run in ("a", "b"):
        study = tune.open_study("s", f"sqlite:///{tmp_path}/{run}.db", SPEC)
        tune.run_study(study, SPEC, bowl, workers=1)
        proposed.append([t.params for t in study.trials])
    assert proposed[0] == proposed[1] and len(proposed[0]) == SPEC.n_trials
    assert len({tuple(p.values()) for p in proposed[0]}) == SPEC.n_trials


def test_a_second_run_of_a_study_resumes_it(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/o.db"
    tune.run_study(tune.open_study("s", storage, SPEC), SPEC, bowl, workers=1)
    more = search_space.Spec(SPACE, "win_rate", "maximize", "eval_loss", 9, 7)
    study = tune.open_study("s", storage, more)
    tune.run_study(study, more, bowl, workers=1)
    assert [t.number for t in study.trials] == list(range(9))  # 3 more, numbered on


@contextlib.contextmanager
def optuna_storage(folder: Path) -> Iterator[str]:
    """A throwaway PostgreSQL database where the machine has PostgreSQL (CI installs it), as a
    team shares one; else SQLite in `folder`."""
    from tests.test_team import HAS_POSTGRESQL, postgresql_database

    if not HAS_POSTGRESQL:
        yield f"sqlite:///{folder}/optuna.db"
        return
    with postgresql_database() as url:
        yield url


@pytest.fixture
def storage(tmp_path):
    with optuna_storage(tmp_path) as url:
        yield url


@pytest.mark.slow
def test_two_workers_share_one_study_and_run_no_trial_twice(storage, tmp_path) -> None:
    """Two worker processes on one storage (PostgreSQL when the machine has it, as a team would
    share it): 8 complete trials, each run once under its own name."""
    ran = tmp_path / "ran"
    script = (
        "import sys, time; from pipeline import search_space, tune\n"
        "from tests.test_tune import SPACE, bowl\n"
        "spec = search_space.Spec(SPACE, 'win_rate', 'maximize', None, 8, 3)\n"
        "def run(values, name):\n"
        f"    open({str(ran)!r}, 'a').write(name + '\\n')\n"
        "    time.sleep(0.3)\n"
        "    return bowl(values, name)\n"
        "tune.run_study(tune.open_study('shared', sys.argv[1], spec), spec, run, workers=1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tune.open_study("shared", storage, SPEC)  # created once, as the first machine would
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, storage],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()
    names = ran.read_text().split()
    assert len(names) == len(set(names)) >= 8
    study = optuna.load_study(study_name="shared", storage=storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) >= 8 and {t.user_attrs["experiment"] for t in complete} <= set(names)
    proposals = [tuple(t.params.values()) for t in study.trials]
    assert len(set(proposals)) == len(proposals)  # no two workers ran the same values


@pytest.mark.slow
def test_a_killed_workers_trial_fails_and_the_study_completes(tmp_path) -> None:
    """A worker killed mid-trial (SIGKILL: no chance to clean up) leaves its trial RUNNING; once
    its heartbeat is older than the grace period, the next worker marks it FAIL and goes on."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    worker = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "tune_worker.py"), storage, "k", "60"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout.readline().startswith("started k-0")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    from tests.tune_worker import SPEC as WORKER_SPEC
    from tests.tune_worker import sleeper

    time.sleep(3)  # past the grace period
    study = tune.open_study("k", storage, WORKER_SPEC, heartbeat=(1, 2))
    tune.run_study(study, WORKER_SPEC, sleeper(0), workers=1)
    states = {t.number: t.state for t in study.trials}
    assert states[0] == optuna.trial.TrialState.FAIL
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 4


@pytest.mark.slow
def test_a_study_ends_in_plots_a_summary_and_a_parent_run_over_the_trials(
    tmp_path, monkeypatch
) -> None:
    """Each stand-in trial opens an MLflow run tagged with its experiment's name, as the train
    stage does; the study's parent run adopts them and holds the plots."""
    from mlflow import MlflowClient
    from PIL import Image

    from pipeline.track.runs import configure, experiment_id

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    configure()
    client, experiment = MlflowClient(), experiment_id("qwen3-dpo")

    def trained(values: dict[str, float], name: str) -> dict[str, float]:
        run = client.create_run(experiment, run_name=name, tags={"dvc_exp_name": name})
        client.set_terminated(run.info.run_id)
        return bowl(values, name)

    study = tune.open_study("p", f"sqlite:///{tmp_path}/optuna.db", SPEC)
    tune.run_study(study, SPEC, trained, workers=1)
    plots = tune_results.write_plots(study, SPEC, tmp_path / "plots")
    assert [p.name for p in plots] == ["history.png", "importances.png", "contour.png"]
    for path in plots:
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 200
    parent = tune_results.log_parent_run(study, SPEC, plots)
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == [f"p-{n}" for n in range(6)]
    assert {a.path for a in client.list_artifacts(parent, "tune")} == {
        "tune/history.png",
        "tune/importances.png",
        "tune/contour.png",
    }
    best = study.best_trial
    lines = tune_results.best_summary(study, SPEC, demo=True)
    assert f"dvc exp apply p-{best.number}" in lines[1]
    assert lines[2].startswith("run it again:") and "python -m demo -S train.lr=" in lines[2]
    assert client.get_run(parent).info.status == "FINISHED"
    assert (
        tune_results.log_parent_run(study, SPEC, plots) == parent
    )  # a resumed study keeps its parent
