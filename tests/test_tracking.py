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


def test_the_split_digest_is_the_hash_dvc_records(tmp_path: Path) -> None:
    """`dvc add` of a folder (nested files, a non-ASCII name) records the same "<md5>.dir"."""
    import subprocess
    import sys

    import yaml

    from pipeline.fingerprint import dvc_dir_hash

    folder = tmp_path / "split"
    (folder / "sub").mkdir(parents=True)
    (folder / "data-00000-of-00001.arrow").write_bytes(bytes(range(256)) * 40)
    (folder / "state.json").write_text('{"a": 1}\r\n')  # DVC 3 hashes bytes: no dos2unix
    (folder / "sub" / "naïve.txt").write_text("x")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "split"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "split.dvc").read_text())["outs"][0]["md5"]
    assert dvc_dir_hash(folder) == recorded and recorded.endswith(".dir")


@pytest.mark.parametrize("local", [True, False])
def test_a_run_names_its_splits_as_mlflow_datasets(
    store: Path, params_file: Path, local: bool
) -> None:
    """The runs list's Dataset column: each split with its source, DVC digest, rows, context."""
    from pipeline.fingerprint import dvc_dir_hash
    from tests.helpers import apply_overrides, input_context, random_pairs

    source = store.parent / "stack-exchange-paired"
    (source / "data" / "rl").mkdir(parents=True)
    if local:
        apply_overrides(params_file, {"data.dataset": str(source)})
    params = load_params(params_file)
    train, held_out = store.parent / "train", store.parent / "eval"
    random_pairs(12).save_to_disk(str(train))
    random_pairs(5, seed=1).save_to_disk(str(held_out))
    run_id = tracking.start_training_run(params, "cpu", None)
    tracking.log_split(train, params, "training")
    tracking.log_split(held_out, params, "evaluation")
    mlflow.end_run()
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    by_context = {input_context(i): i.dataset for i in inputs}
    assert set(by_context) == {"training", "evaluation"}
    logged = by_context["training"]
    assert logged.digest == dvc_dir_hash(train) and '"num_rows": 12' in logged.profile
    assert '"num_rows": 5' in by_context["evaluation"].profile
    if local:
        assert logged.name == "stack-exchange-paired/data/rl"
        assert logged.source_type == "local" and str(source / "data" / "rl") in logged.source
    else:
        assert logged.name == "stack-exchange-paired/data/rl"
        assert logged.source_type == "hugging_face"
        assert '"path": "lvwerra/stack-exchange-paired"' in logged.source
        assert '"revision": "main"' in logged.source and '"data_dir": "data/rl"' in logged.source
