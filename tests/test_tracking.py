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


def test_tracking_uri_overrides_the_default(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = store.parent / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking.configure() == f"sqlite:///{other}"
    experiment = mlflow.get_experiment(tracking.experiment_id("x"))
    assert "mlartifacts" not in experiment.artifact_location  # the server decides


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
