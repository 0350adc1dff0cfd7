from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.params import load_params
from pipeline.track import runs as tracking


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
