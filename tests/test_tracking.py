from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.params import load_params
from pipeline.track import runs as tracking

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DVC_ROOT at tmp/root, the stage running elsewhere (as in `dvc exp run --temp`)."""
    root, elsewhere = tmp_path / "root", tmp_path / "exp-copy"
    root.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "placeholder")  # restored after the test...
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # ...because mlflow exports it when set
    monkeypatch.chdir(elsewhere)
    yield root
    if mlflow.active_run():
        mlflow.end_run()


def test_store_and_artifacts_live_at_dvc_root(store: Path) -> None:
    assert tracking.configure() == f"sqlite:///{store / 'mlflow.db'}"
    experiment = mlflow.get_experiment(tracking.experiment_id("qwen3-dpo"))
    assert experiment.artifact_location == (store / "mlartifacts").as_uri()
    assert tracking.experiment_id("qwen3-dpo") == experiment.experiment_id  # found, not re-made
    # Marked as model training, not GenAI development, as MLflow 3 records it.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_made_before_the_kind_tag_gets_it(store: Path) -> None:
    tracking.configure()
    old = mlflow.create_experiment("made-earlier")
    tracking.experiment_id("made-earlier")
    assert mlflow.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_champion_gate_compares_win_rate_then_held_out_loss() -> None:
    from pipeline.track.registry import beats

    champion = {"win_rate": "0.91", "eval_loss": "0.22"}  # registry tags are strings
    assert beats({"win_rate": 0.92, "eval_loss": 0.5}, champion)
    assert not beats({"win_rate": 0.90, "eval_loss": 0.1}, champion)
    assert beats({"win_rate": 0.91, "eval_loss": 0.2}, champion)  # a tie broken by the loss
    assert not beats({"win_rate": 0.91, "eval_loss": 0.66}, champion)
    assert not beats({"win_rate": 0.91, "eval_loss": 0.22}, champion)  # a full tie keeps it
    assert beats({"win_rate": 0.91, "eval_loss": 0.5}, {"win_rate": "0.91"})  # an old champion


def test_tracking_uri_overrides_the_default(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = store.parent / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking.configure() == f"sqlite:///{other}"
    experiment = mlflow.get_experiment(tracking.experiment_id("x"))
    assert "mlartifacts" not in experiment.artifact_location  # the server decides


def test_nan_metrics_are_left_out(store: Path) -> None:
    tracking.configure()
    with mlflow.start_run() as run:
        tracking.log_flat_metrics({"tau": float("nan"), "nested": {"rate": 0.5}}, "eval/")
    assert MlflowClient().get_run(run.info.run_id).data.metrics == {"eval/nested/rate": 0.5}


def test_run_logs_params_as_numbers_tags_and_steps(store: Path, params_file: Path) -> None:
    params_file.write_text(params_file.read_text().replace("lr: 5e-6", "lr: 1e-06"))
    params = load_params(params_file)
    run_id = tracking.start_training_run(params, "cpu", None)
    tracking.log_step({"step": 1, "loss": 0.69})
    tracking.log_step({"step": 2, "loss": 0.5})
    mlflow.end_run()
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "1e-06" and float(run.data.params["train.lr"]) == 1e-6
    assert run.data.params["data.fraction"] == "0.01"
    assert run.data.tags["device"] == "cpu" and len(run.data.tags["params_hash"]) == 16
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.69), (2, 0.5)]
    assert tracking.start_training_run(params, "cpu", run_id) == run_id  # a resume continues it
    mlflow.end_run()


def test_run_file_round_trip(tmp_path: Path) -> None:
    tracking.write_run_file(tmp_path, "abc")
    assert tracking.read_run_id(tmp_path) == "abc"
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        tracking.read_run_id(tmp_path / "missing")


RACER = """
import sys, time
import mlflow
from pipeline.track import registry, runs
version, start = sys.argv[1], float(sys.argv[2])
runs.configure()
read = registry.current_champion
def slow_read(*args):  # widen the gap between reading the champion and setting the alias
    champion = read(*args)
    time.sleep(1.5)
    return champion
registry.current_champion = slow_read
while time.time() < start:
    time.sleep(0.01)
print(registry.assign_alias(mlflow.MlflowClient(), "m", version, "champion", "challenger")[0])
"""


def test_two_registers_at_once_end_with_the_better_one_as_champion(store: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    tracking.configure()
    client = MlflowClient()
    client.create_registered_model("m")
    tags = {"better": {"win_rate": "0.9", "eval_loss": "0.2"}, "worse": {"win_rate": "0.8"}}
    versions = {k: client.create_model_version("m", str(store), tags=t) for k, t in tags.items()}
    start = time.time() + 15  # both processes past their imports, the better one a bit first
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-c",
                RACER,
                str(v.version),
                str(start + (0.2 if name == "worse" else 0)),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, v in versions.items()
    }
    said = {name: p.communicate(timeout=120)[0].strip() for name, p in racers.items()}
    # The better one ends as champion whatever the order the lock let them in.
    assert said["better"] == "champion", said
    champion = client.get_model_version_by_alias("m", "champion")
    assert str(champion.version) == str(versions["better"].version)
