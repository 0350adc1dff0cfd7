"""The data half of the DAG run by DVC on the offline demo, in a throwaway copy of the repo."""

import json
import math
import sys

import datasets
import pytest

from pipeline.data.schema import TOKENIZED_SCHEMA
from tests.e2e import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_repo(e2e_repo):
    repo, env = e2e_repo("data-dag", demo_params=True)
    output = run(repo, env, sys.executable, "-m", "dvc", "repro", "tokenize")
    return repo, env, output


def test_repro_tokenize_writes_loadable_arrow_shards(data_repo) -> None:
    repo, _, output = data_repo
    for stage in ("download_model", "download_data", "subsample", "tokenize"):
        assert f"Running stage '{stage}'" in output
    for split in ("train", "eval"):
        shards = datasets.load_from_disk(str(repo / "data" / "tokenized" / split))
        assert len(shards) > 0
        assert set(shards.column_names) == set(TOKENIZED_SCHEMA.names)
    report = json.loads((repo / "reports" / "tokenize.json").read_text())
    assert report["train"]["shards"] > 1  # several Arrow shards, as the contract says
    assert (
        len(list((repo / "data/tokenized/train").glob("data-*.arrow"))) == report["train"]["shards"]
    )
    assert (repo / "models/base/model.safetensors").is_file()
    assert not list((repo / "models/base").glob("*.bin"))
    resolved = json.loads((repo / "data/tokenized/resolved_params.json").read_text())
    assert resolved["tokenize"]["max_length"] == 192


def test_no_question_is_in_both_splits(data_repo) -> None:
    repo, _, _ = data_repo
    train = datasets.load_from_disk(str(repo / "data/tokenized/train"))
    evaluation = datasets.load_from_disk(str(repo / "data/tokenized/eval"))
    assert not set(train["question_id"]) & set(evaluation["question_id"])
    counts = json.loads((repo / "reports/subsample.json").read_text())
    assert counts["train_removed_eval_overlap"] > 0  # the demo data plants an overlap


def test_changing_the_fraction_reruns_only_what_depends_on_it(data_repo) -> None:
    repo, env, _ = data_repo
    output = run(
        repo, env, sys.executable, "-m", "dvc", "exp", "run", "-S", "data.fraction=0.5", "tokenize"
    )
    assert "Running stage 'download_model'" not in output
    for stage in ("download_data", "subsample", "tokenize"):
        assert f"Running stage '{stage}'" in output
    counts = json.loads((repo / "reports/subsample.json").read_text())
    manifest = json.loads((repo / "data/raw/train/manifest.json").read_text())
    assert counts["train_target"] == math.ceil(0.5 * manifest["source_rows"])
    assert manifest["rows_fetched"] < manifest["source_rows"]  # not every shard was fetched


def test_killed_train_stage_resumes_to_the_uninterrupted_result(data_repo) -> None:
    """SIGKILL the real train stage after its first checkpoint; the re-run resumes from it."""
    import shutil
    import signal
    import subprocess
    import time

    import yaml

    repo, env, _ = data_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=60, save_every=20, log_every=10)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train = [sys.executable, "-m", "stages.train"]
    run(repo, env, sys.executable, "-m", "stages.reference")
    run(repo, env, *train)
    whole = json.loads((repo / "metrics/train.json").read_text())
    assert not list(repo.glob("checkpoints/train/*/step-*"))  # a completed run keeps none
    shutil.rmtree(repo / "models/policy")

    process = subprocess.Popen(
        train, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (found := list(repo.glob("checkpoints/train/*/step-00000020/meta.json"))):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = found[0]
    assert first.exists() and not (repo / "models/policy").exists()
    killed_run = json.loads(first.read_text())["run_id"]

    output = run(repo, env, *train)
    assert "resuming from" in output
    resumed = json.loads((repo / "metrics/train.json").read_text())
    assert resumed["steps"] == whole["steps"] == 60
    assert abs(resumed["final_loss"] - whole["final_loss"]) < 1e-4
    assert resumed["epoch_losses"] == pytest.approx(whole["epoch_losses"], abs=1e-4)
    run_file = json.loads((repo / "models/policy/mlflow_run.json").read_text())
    assert run_file["run_id"] == killed_run  # the same MLflow run carries on
