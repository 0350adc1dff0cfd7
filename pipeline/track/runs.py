"""MLflow tracking: where the store is, one run per trained policy, re-opened by later stages.

Default store: SQLite plus a local artifact folder at the repository root. The root is DVC_ROOT
when DVC sets it, because `dvc exp run --temp` and queued experiments run in a temporary copy
that is deleted afterwards; anchoring on the real root keeps their runs. MLFLOW_TRACKING_URI (a
team's tracking server) overrides all of it. Under torchrun only rank 0 talks to MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source

from pipeline.data.schema import load_tokenized
from pipeline.download.hub import HUB_ID
from pipeline.fingerprint import dvc_dir_hash
from pipeline.params import Params
from pipeline.stage_io import repo_root, write_json_atomic
from pipeline.strict_yaml import flatten

RUN_FILE = "mlflow_run.json"  # written into models/policy: how evaluate and register find the run


def default_uri() -> str:
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow at the store and return its URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


# MLflow 3 records what an experiment is for in this tag; ours holds model training runs, not
# GenAI traces. (Which pages the UI opens on is a per-browser choice: see docs/tracking.md.)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(name: str) -> str:
    """The experiment's id, created on first use (artifacts beside a local store)."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if KIND_TAG not in found.tags:  # made by an older version of this project
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
        return found.experiment_id
    location = None
    # Not an environment check: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI itself.
    if mlflow.get_tracking_uri() == default_uri():
        location = (repo_root() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})


def flat_params(params: Params) -> dict[str, Any]:
    """{"train.lr": 1e-06, ...}: values are the parsed numbers, not DVC's spelling of them."""
    return flatten(dataclasses.asdict(params))


def params_hash(params: Params) -> str:
    return hashlib.sha256(json.dumps(flat_params(params), sort_keys=True).encode()).hexdigest()[:16]


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_tags() -> dict[str, str]:
    """Where a run or model version came from: the DVC experiment and the git commit."""
    return {
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
        "git_commit": git_commit(Path.cwd()),
    }


def run_tags(params: Params, device: str) -> dict[str, str]:
    return {
        **provenance_tags(),
        "params_hash": params_hash(params),
        "device": device,
        "model": params.model.name,
        "dataset": params.data.dataset,
    }


def start_training_run(params: Params, device: str, run_id: str | None) -> str:
    """Start the policy's run (or continue `run_id` after a resume); return its id."""
    configure()
    if run_id is not None:
        mlflow.start_run(run_id=run_id)
        return run_id
    run = mlflow.start_run(
        experiment_id=experiment_id(params.register.experiment),
        run_name=os.environ.get("DVC_EXP_NAME"),
        tags=run_tags(params, device),
    )
    mlflow.log_params(flat_params(params))
    return run.info.run_id


def log_split(
    split: Path, params: Params, context: str, origin: tuple[str, str, str] | None = None
) -> None:
    """Name a tokenized split as an input of the active run, with MLflow's dataset API: where
    its pairs come from (the hub dataset, folder and revision, or the local folder), DVC's hash
    of the split's folder as digest, its row count and schema. The runs list shows it in its
    Dataset column, and searches and compares runs by it. `context`: training or evaluation.
    `origin`: (dataset, revision, split) of an extra held-out set; else data.*'s own split."""
    data = params.data
    folder = data.train_dir if context == "training" else data.eval_dir
    dataset_name, revision = data.dataset, data.revision
    if origin is not None:
        dataset_name, revision, folder = origin
    local = Path(dataset_name).expanduser()
    # MLflow warns that it registers its local source class twice, and that the integer columns
    # of the schema it infers cannot hold missing values: neither is the user's to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if HUB_ID.match(dataset_name) and not local.is_dir():
            source: dict[str, Any] = {"path": dataset_name, "data_dir": folder}
            source["revision"] = revision
        else:
            source = {"source": resolve_dataset_source(str(local.resolve() / folder))}
        dataset = mlflow.data.from_huggingface(
            load_tokenized(split),
            name=f"{Path(dataset_name).name}/{folder}",
            digest=dvc_dir_hash(split),
            **source,
        )
        mlflow.log_input(dataset, context=context)  # infers the schema


def log_reports(folder: Path, names: tuple[str, ...]) -> None:
    """Attach the data stages' reports (`<folder>/<name>.json`, where present) to the active run."""
    for name in names:
        if (folder / f"{name}.json").is_file():
            mlflow.log_artifact(str(folder / f"{name}.json"), artifact_path="reports")


def log_step(row: dict[str, float]) -> None:
    """One row of the train log as MLflow step metrics (train/<name>)."""
    step = int(row["step"])
    mlflow.log_metrics({f"train/{k}": float(v) for k, v in row.items() if k != "step"}, step=step)


def step_logger(run_id: str) -> Callable[[dict[str, float]], None]:
    """`log_step` for a run that may be resumed: rows the run already holds (logged after its
    last checkpoint, before it was stopped) are not logged twice."""
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    logged = max((point.step for point in history), default=0)

    def log_new(row: dict[str, float]) -> None:
        if int(row["step"]) > logged:
            log_step(row)

    return log_new


def write_run_file(folder: Path, run_id: str) -> None:
    write_json_atomic(folder / RUN_FILE, {"run_id": run_id})


def read_run_id(folder: Path) -> str:
    path = folder / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the train stage first")
    return json.loads(path.read_text())["run_id"]


def log_flat_metrics(metrics: dict[str, Any], prefix: str) -> None:
    """Numbers of a (possibly nested) metrics dict as `<prefix><key>` MLflow metrics."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            log_flat_metrics(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if value == value:  # NaN (tau with no ranked question) is no figure: not logged
                mlflow.log_metric(f"{prefix}{key}", float(value))
