"""The whole DAG on the offline demo, run twice as DVC experiments the way the README says.

Checks what a user relies on: every stage ran, the trained policy beats the reference on held-out
pairs, MLflow holds both runs with params and step metrics, the registry has versions with
aliases, the champion loads back and generates, and params.yaml is left as committed.
"""

import csv
import io
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from tests.e2e import copy_repo, environment, run

pytestmark = pytest.mark.slow
STAGES = (
    "download_model",
    "download_data",
    "subsample",
    "tokenize",
    "reference",
    "train",
    "evaluate",
    "register",
)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, asset_cache, demo_model_dir, demo_dataset_dir):
    repo = copy_repo(tmp_path_factory.mktemp("full-dag"))
    env = environment(asset_cache)
    params_before = (repo / "params.yaml").read_text()
    first = run(repo, env, sys.executable, "-m", "pipeline.demo", "--name", "demo-first")
    second = run(
        repo,
        env,
        sys.executable,
        "-m",
        "pipeline.demo",
        "--name",
        "demo-lr",
        "-S",
        "train.lr=1e-06",
    )
    assert (repo / "params.yaml").read_text() == params_before, "the demo modified params.yaml"
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    return repo, env, first, second, client


def test_first_experiment_runs_every_stage(demo_runs) -> None:
    _, _, first, _, _ = demo_runs
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first, stage


def test_second_experiment_restores_data_and_reference_from_cache(demo_runs) -> None:
    _, _, _, second, _ = demo_runs
    for stage in STAGES[:5]:
        assert f"Running stage '{stage}'" not in second, f"{stage} should come from the cache"
    for stage in STAGES[5:]:
        assert f"Running stage '{stage}'" in second, stage


def test_dvc_exp_show_lists_both_experiments_with_metrics(demo_runs) -> None:
    repo, env, _, _, _ = demo_runs
    table = run(repo, env, sys.executable, "-m", "dvc", "exp", "show", "--csv")
    rows = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(table))}
    assert {"demo-first", "demo-lr"} <= set(rows)
    assert float(rows["demo-first"]["win_rate"]) >= 0.8
    assert float(rows["demo-lr"]["train.lr"]) == 1e-6


def runs_by_name(client: MlflowClient) -> dict:
    experiment = client.get_experiment_by_name("qwen3-dpo")
    runs = client.search_runs([experiment.experiment_id])
    return {r.data.tags["dvc_exp_name"]: r for r in runs}


def test_mlflow_has_both_runs_with_params_steps_and_eval(demo_runs) -> None:
    _, _, _, _, client = demo_runs
    runs = runs_by_name(client)
    assert {"demo-first", "demo-lr"} <= set(runs)
    first, second = runs["demo-first"], runs["demo-lr"]
    assert (
        float(second.data.params["train.lr"]) == 1e-6 and second.data.params["train.lr"] == "1e-06"
    )
    assert first.data.metrics["eval/win_rate"] >= 0.8
    assert first.data.metrics["eval_reference/win_rate"] == 0.5
    history = client.get_metric_history(first.info.run_id, "train/loss")
    assert len(history) >= 5 and history[0].step < history[-1].step
    assert abs(history[0].value - 0.6931) < 0.05  # first window starts at ln 2
    assert first.data.tags["git_commit"] != "unknown" and first.data.tags["params_hash"]
    for run_ in (first, second):
        assert client.get_metric_history(run_.info.run_id, "train/loss")


def test_registry_versions_aliases_and_champion_generates(demo_runs) -> None:
    repo, _, _, _, client = demo_runs
    versions = client.search_model_versions("name='qwen3-dpo'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("qwen3-dpo", "champion")
    challenger = client.get_model_version_by_alias("qwen3-dpo", "challenger")
    # lr=1e-6 barely moves the tiny model: it must not take the champion's place.
    assert champion.tags["dvc_exp_name"] == "demo-first"
    assert challenger.tags["dvc_exp_name"] == "demo-lr"
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/qwen3-dpo@champion")
    answers = model.predict(
        ["Question: How do I reverse a list in Python?\n\nAnswer: "], params={"max_new_tokens": 12}
    )
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0].strip()


def test_exp_diff_and_plots_diff_compare_the_experiments(demo_runs, tmp_path) -> None:
    repo, env, _, _, _ = demo_runs
    diff = run(
        repo, env, sys.executable, "-m", "dvc", "exp", "diff", "--all", "demo-first", "demo-lr"
    )
    assert "train.lr" in diff and "win_rate" in diff
    out = tmp_path / "plots"
    run(
        repo,
        env,
        sys.executable,
        "-m",
        "dvc",
        "plots",
        "diff",
        "demo-first",
        "demo-lr",
        "-o",
        str(out),
    )
    page = (out / "index.html").read_text()
    assert "rewards/margins" in page and "demo-lr" in page

    run(repo, env, sys.executable, "-m", "dvc", "exp", "apply", "demo-first")
    assert "win_rate" in run(repo, env, sys.executable, "-m", "dvc", "metrics", "diff", "--all")
    shown = tmp_path / "shown"
    run(repo, env, sys.executable, "-m", "dvc", "plots", "show", "-o", str(shown))
    assert "rewards/margins" in (shown / "index.html").read_text()


def test_mlflow_ui_serves_both_runs_on_loopback(demo_runs) -> None:
    """`mlflow ui` as the README starts it; its REST API lists both runs and their curves."""
    import json
    import socket
    import subprocess
    import time
    import urllib.request

    repo, env, _, _, client = demo_runs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        "sqlite:///mlflow.db",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        experiment = client.get_experiment_by_name("qwen3-dpo").experiment_id
        request = urllib.request.Request(
            f"{base}/runs/search",
            data=json.dumps({"experiment_ids": [experiment]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.load(urllib.request.urlopen(request, timeout=10))["runs"]
        names = {r["info"]["run_name"] for r in runs}
        assert {"demo-first", "demo-lr"} <= names
        for r in runs:
            url = f"{base}/metrics/get-history?run_id={r['info']['run_id']}&metric_key=train/loss"
            history = json.load(urllib.request.urlopen(url, timeout=10))["metrics"]
            assert len(history) >= 5  # comparable curves: every run has its loss per step
    finally:
        server.terminate()
        server.wait(timeout=30)
