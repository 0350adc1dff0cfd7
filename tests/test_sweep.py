"""A queued sweep on the offline demo, run with two workers the way the README says; then a tuned
study of real demo trials in the same clone, whose first worker is killed mid-trial.

After one demo run (the champion, its data stages cached) three experiments are queued: the
README's two lr lines, and one on other held-out pairs (data.eval_size 200), whose register stage
must score the champion on its own pairs before deciding. Checks: every experiment succeeded,
nothing lost (runs, loss points, versions), the lr experiments re-ran only train, evaluate and
register, exactly one champion and no version that beats it on the same pairs, and that the
re-scoring is the evaluate stage's own computation (it reproduces a version's recorded figures,
and gives the base model the figures evaluate recorded for the reference).
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from tests.e2e import run
from tests.test_full_dag import readme_block

pytestmark = pytest.mark.slow
DVC = (sys.executable, "-m", "dvc")


def readme_sweep() -> tuple[list[list[str]], list[str]]:
    """The README's queued demo experiments and its `dvc queue start` line."""
    queued, start = [], []
    for line in readme_block("sweep").splitlines():
        words = shlex.split(line, comments=True)
        if words[:3] == ["python", "-m", "demo"]:
            queued.append([sys.executable, *words[1:]])
        elif words[:3] == ["dvc", "queue", "start"]:
            start = [*DVC, *words[1:]]
    return queued, start


def run_queue(repo: Path, env: dict[str, str], start: list[str], limit: float = 1200) -> str:
    """`dvc queue start ...`, then `dvc queue status` (as the README says) until no task is
    queued or running and the workers have stopped by themselves. Returns the last status."""
    # The workers inherit the command's stdout: with a pipe, waiting for the command would wait
    # for them to exit too. So the command writes to nowhere and only its exit is awaited.
    subprocess.run(
        start,
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
        check=True,
    )
    deadline, misread = time.monotonic() + limit, 0
    while time.monotonic() < deadline:
        done = subprocess.run(
            [*DVC, "queue", "status"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        status = done.stdout + done.stderr
        # DVC can read a task's info file while a worker is writing it ("unexpected error -
        # Expecting value", treeverse/dvc#8014): a poll, not the queue, failed. Ask again.
        if done.returncode != 0 and "unexpected error" in status and misread < 5:
            misread += 1
            time.sleep(2)
            continue
        assert done.returncode == 0, f"dvc queue status failed ({done.returncode}):\n{status}"
        idle = "0 active, 0 idle" in status
        if idle and not any(word in status for word in (" Queued", " Running")):
            return status
        time.sleep(2)
    raise AssertionError(f"the queue did not finish in {limit} s:\n{status}")


def again(command: list[str]) -> list[str]:
    """A queued line of the first sweep as a second sweep has it: a new name, and beta 0.2 so
    that each experiment trains again rather than coming from the run-cache. It stops after
    AGAIN_STEPS: the second sweep checks that the queue serves a second round (both workers
    start, every task succeeds, the workers stop by themselves), not the demo's figures."""
    name = command.index("--name") + 1
    renamed = [*command[:name], f"{command[name]}-again", *command[name + 1 :]]
    return [*renamed, "-S", "loss.beta=0.2", "-S", f"train.max_steps={AGAIN_STEPS}"]


AGAIN_STEPS = 20
SWEPT = ("sweep-3e-4", "sweep-6e-4", "sweep-eval-200")
SWEPT_AGAIN = ("sweep-3e-4-again", "sweep-6e-4-again")


@pytest.fixture(scope="module")
def sweep(e2e_repo):
    """One demo run (the champion, its data stages cached), then the README's sweep twice in the
    same clone: its two queued lines plus one on other held-out pairs, then the two lines again,
    shorter."""
    repo, env = e2e_repo("sweep")
    demo = (sys.executable, "-m", "demo")
    run(repo, env, *demo, "--name", "sweep-base")
    queued, start = readme_sweep()
    assert len(queued) == 2 and start[-2:] == ["-j", "2"], (queued, start)
    queued.append([*demo, "--queue", "-S", "data.eval_size=200", "--name", "sweep-eval-200"])
    for round_ in (queued, [again(command) for command in queued[:2]]):
        for command in round_:
            run(repo, env, *command)
        started = time.monotonic()
        status = run_queue(repo, env, start)
        print(f"{len(round_)} queued experiments, -j 2: {time.monotonic() - started:.0f} s")
    logs = {name: run(repo, env, *DVC, "queue", "logs", name) for name in SWEPT}
    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    return repo, env, status, logs, client


def runs_by_name(client: MlflowClient) -> dict:
    experiment = client.get_experiment_by_name("qwen3-dpo")
    return {r.data.tags["dvc_exp_name"]: r for r in client.search_runs([experiment.experiment_id])}


def test_every_queued_experiment_succeeds_and_reruns_only_the_training_side(sweep) -> None:
    _, _, status, logs, _ = sweep
    assert status.count("Success") == 5 and "Failed" not in status, status  # both sweeps
    assert "0 active, 0 idle" in status  # the workers stopped by themselves
    for name in ("sweep-3e-4", "sweep-6e-4"):
        for stage in ("train", "evaluate", "register"):
            assert f"Running stage '{stage}'" in logs[name], (name, stage)
        for stage in ("download_model", "download_data", "subsample", "tokenize", "reference"):
            assert f"Running stage '{stage}'" not in logs[name], (name, stage)
    assert "Running stage 'reference'" in logs["sweep-eval-200"]  # other pairs: new data


def test_no_run_version_or_metric_point_is_lost(sweep) -> None:
    _, _, _, _, client = sweep
    runs = runs_by_name(client)
    assert set(runs) == {"sweep-base", *SWEPT, *SWEPT_AGAIN}
    for name, r in runs.items():  # every logged step arrived: the whole schedule, no gap
        steps, params = int(r.data.metrics["train_summary/steps"]), r.data.params
        every, per_epoch = int(params["train.log_every"]), steps // int(params["train.epochs"])
        expected = {s for s in range(1, steps + 1) if s % every == 0 or s % per_epoch == 0}
        history = client.get_metric_history(r.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == sorted(expected), name
    for r in runs.values():
        assert {"eval/win_rate", "eval/eval_loss", "train_summary/final_loss"} <= set(
            r.data.metrics
        )
    versions = client.search_model_versions("name='qwen3-dpo'")
    assert sorted(v.tags["dvc_exp_name"] for v in versions) == sorted(runs)


def test_one_champion_that_no_version_beats_on_its_pairs(sweep) -> None:
    from pipeline.track.champion import GATES, beats

    _, _, _, logs, client = sweep
    champion = client.get_model_version_by_alias("qwen3-dpo", "champion")
    for version in client.search_model_versions("name='qwen3-dpo'"):
        if all(version.tags[k] == champion.tags[k] for k in GATES["win_rate"].key_tags):
            assert not beats(version.tags, champion.tags), (version.version, champion.version)
    # The experiment on other pairs was judged against the champion re-scored on its pairs.
    assert "re-scored on these held-out pairs" in logs["sweep-eval-200"]
    other = runs_by_name(client)["sweep-eval-200"].data.metrics
    assert {"register/champion_win_rate", "register/champion_eval_loss"} <= set(other)
    for name in ("sweep-3e-4", "sweep-6e-4"):  # same pairs: the recorded figures decided
        assert "register/champion_win_rate" not in runs_by_name(client)[name].data.metrics


def test_rescoring_is_the_evaluate_stage_computation(sweep, monkeypatch) -> None:
    """In the workspace of the first run: re-scoring that version on its own pairs gives back
    its recorded figures, and the base model scored as a policy gives the loss ln 2."""
    import mlflow

    from pipeline.params import load_params
    from pipeline.stage_io import MODEL_BASE
    from pipeline.track.registry import log_policy
    from pipeline.track.rescore import champion_scorer

    repo, env, _, _, client = sweep
    run(repo, env, *DVC, "exp", "apply", "sweep-base")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", client.tracking_uri)
    base_run = runs_by_name(client)["sweep-base"].info.run_id
    rescore = champion_scorer(load_params(), base_run)
    (version,) = (
        v
        for v in client.search_model_versions("name='qwen3-dpo'")
        if v.tags["dvc_exp_name"] == "sweep-base"
    )
    figures = rescore(version)
    assert figures["win_rate"] == float(version.tags["win_rate"])
    assert figures["eval_loss"] == float(version.tags["eval_loss"])
    mlflow.set_tracking_uri(client.tracking_uri)
    logged = log_policy(base_run, MODEL_BASE, load_params().tokenize)
    probe = mlflow.register_model(logged, "probe")
    untrained = rescore(client.get_model_version("probe", probe.version))
    # Policy == reference: every log-ratio ~0 (the two ran with other thread counts, so not
    # bit for bit, and the win rate is a coin toss of rounding signs: not checked). The loss
    # is the DPO part, ln 2, plus the RPO term (loss.sft_weight times the chosen answer's
    # NLL), which evaluate recorded for the reference judged as a policy.
    reference = json.loads((repo / "reports" / "eval.json").read_text())["reference"]
    assert abs(untrained["eval_loss"] - reference["eval_loss"]) < 1e-4, (untrained, reference)
    sft_weight = load_params().loss.sft_weight
    assert (reference["eval_loss"] > math.log(2) + 1e-3) == (sft_weight > 0), reference


TUNE_STEPS = 20  # trials stop at this step: the study checks the workers, not the figures


def kill_with_descendants(pid: int) -> None:
    """SIGKILL a process and everything it started (the DVC experiment runs in a session of its
    own): a worker's machine lost mid-trial, with no chance to clean up."""
    import psutil

    worker = psutil.Process(pid)
    family = [worker, *worker.children(recursive=True)]
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def tuned(sweep, tmp_path_factory):
    """After the sweeps, in the same clone: the README's `python -m pipeline.tune --demo` as two
    worker processes on one storage (PostgreSQL where the machine has it), trials of real demo
    experiments stopped at TUNE_STEPS. The first worker is killed mid-trial with everything it
    started; the second, running two trials at a time, completes the study."""
    from tests.test_tune import optuna_storage

    repo, env, *_, client = sweep
    command = [
        *readme_tune_demo("tuned"),
        "--n-trials",
        "4",
        "--heartbeat",
        "2",
        "-S",
        f"train.max_steps={TUNE_STEPS}",
    ]
    logs = repo / "reports" / "tune" / "tuned"
    with optuna_storage(tmp_path_factory.mktemp("optuna")) as storage:
        env = {**env, "OPTUNA_STORAGE": storage}
        doomed = subprocess.Popen(
            command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        until_running(logs / "tuned-0.log", doomed)
        survivor = subprocess.Popen(
            [*command, "--workers", "2"],
            cwd=repo,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        until_running(logs / "tuned-1.log", survivor)
        kill_with_descendants(doomed.pid)
        output = survivor.communicate(timeout=1200)[0]
        assert survivor.returncode == 0, output[-6000:]
        yield repo, env, optuna.load_study(study_name="tuned", storage=storage), output, client


def readme_tune_demo(study: str) -> list[str]:
    """The README's tune command on the demo, for study `study`."""
    (line,) = (line for line in readme_block("tune").splitlines() if "--demo" in line)
    words = shlex.split(line, comments=True)
    assert words[:3] == ["python", "-m", "pipeline.tune"] and "--study" in words, words
    words[words.index("--study") + 1] = study
    return [sys.executable, *words[1:]]


def until_running(log: Path, worker: subprocess.Popen, limit: float = 600) -> None:
    """Wait until the trial logging to `log` is training (mid-trial, past its start)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"the worker exited ({worker.returncode}) before {log.name}"
        if log.exists() and "Running stage 'train'" in log.read_text(errors="replace"):
            return
        time.sleep(1)
    raise AssertionError(f"{log.name} did not reach the train stage in {limit:.0f} s")


def test_a_tuned_study_of_real_trials_outlives_a_killed_worker(tuned) -> None:
    repo, env, study, output, client = tuned
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "FAIL", states  # the killed worker's, once its heartbeats stopped
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    # Two trials at a time: one may start before the fourth completes, so 4 or 5 complete.
    assert 4 <= len(complete) <= 5 and set(states.values()) == {"FAIL", "COMPLETE"}, states
    assert len({tuple(t.params.values()) for t in study.trials}) == len(study.trials)
    names = [t.user_attrs["experiment"] for t in complete]
    experiments = run(repo, env, *DVC, "exp", "list", "--name-only").split()
    assert set(names) <= set(experiments) and "tuned-0" not in experiments
    parent = client.search_runs(
        [client.get_experiment_by_name("qwen3-dpo").experiment_id], "tags.tune_parent = 'true'"
    )[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tune-tuned"
    versions = {v.tags["dvc_exp_name"] for v in client.search_model_versions("name='qwen3-dpo'")}
    for trial in complete:  # one run and one registry version each, with the trial's values
        (r,) = client.search_runs(
            [parent.info.experiment_id], f"tags.dvc_exp_name = '{trial.user_attrs['experiment']}'"
        )
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert int(r.data.metrics["train_summary/steps"]) == TUNE_STEPS
        lr = float(r.data.params["train.lr"])
        assert math.isclose(lr, trial.params["train.lr"], rel_tol=1e-5)
        assert r.data.metrics["eval/win_rate"] == trial.user_attrs["metrics"]["win_rate"]
        assert trial.user_attrs["experiment"] in versions
    best = study.best_trial.user_attrs["experiment"]
    assert f"dvc exp apply {best}" in output and f"-S train.max_steps={TUNE_STEPS}" in output
