"""The README's team story, for real: a shared MLflow server and a DVC remote.

One DAG run on the offline demo logs to an `mlflow server` on 127.0.0.1 (PostgreSQL backend store
when PostgreSQL is installed, else SQLite; artifacts proxied into a folder), then is pushed to a
DVC directory remote; a `git clone` of that repository pulls it and finds nothing to re-run.
The backend in use is in every test id: test_...[postgresql] or test_...[sqlite].
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from demo.dataset import MODEL_FOLDER
from tests.e2e import git, run
from tests.test_full_dag import STAGES

pytestmark = pytest.mark.slow


def find_initdb() -> Path | None:
    """PostgreSQL's initdb: Debian's newest /usr/lib/postgresql/<version>/bin, else on PATH."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    found = debian[-1] if debian else shutil.which("initdb")
    return Path(found).resolve() if found else None


def postgres_user_exists() -> bool:
    try:
        pwd.getpwnam("postgres")
        return True
    except KeyError:
        return False


# As root, PostgreSQL runs as the `postgres` OS user (Debian's package creates it).
HAS_POSTGRESQL = find_initdb() is not None and (os.geteuid() != 0 or postgres_user_exists())
BACKEND = "postgresql" if HAS_POSTGRESQL else "sqlite"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, process: subprocess.Popen, log: Path, what: str, timeout: float = 120):
    """Poll `ready()` until true; fail with the process's log if it exits or never gets ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.3)
    raise AssertionError(f"{what} did not start:\n{log.read_text(errors='replace')[-4000:]}")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started in its own session, with its children (uvicorn workers)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def postgresql_database() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields the URI of an empty database.

    PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` OS user
    and initdb and postgres run as that user (Popen's user=, like `runuser -u postgres --`).
    """
    bin_dir = find_initdb().parent
    as_owner = {}
    # In /tmp itself, not pytest's root-only tmp folder, which the postgres user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="team-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, log, port = folder / "data", folder / "postgres.log", free_port()
    server = None
    try:
        done = subprocess.run(
            [
                bin_dir / "initdb",
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=folder,
            capture_output=True,
            text=True,
            **as_owner,
        )
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}{done.stderr}"
        with log.open("wb") as out:
            server = subprocess.Popen(
                [
                    bin_dir / "postgres",
                    "-D",
                    data,
                    "-p",
                    str(port),
                    "-k",
                    folder,
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                ],
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_owner,
            )
        import psycopg2

        def connect(database: str):
            return psycopg2.connect(
                host="127.0.0.1", port=port, user="postgres", dbname=database, connect_timeout=2
            )

        wait_until(lambda: connect("postgres").close() is None, server, log, "postgres")
        admin = connect("postgres")
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE mlflow")
        admin.close()
        # The driver named: SQLAlchemy 2.1 takes a bare postgresql:// to mean psycopg 3.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if server is not None:
            stop(server, signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(folder, ignore_errors=True)


def stored_run_ids(backend_uri: str) -> set[str]:
    """Run ids read straight from the backend store's tables, not through MLflow."""
    if backend_uri.startswith("postgresql"):
        import psycopg2

        connection = psycopg2.connect(backend_uri.replace("+psycopg2", ""))
    else:
        connection = sqlite3.connect(backend_uri.removeprefix("sqlite:///"))
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT run_uuid FROM runs")
        return {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[str]:
    """`mlflow server` as the README starts it; yields its http:// URI."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [
        Path(sys.executable).parent / "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        server = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        health = f"{uri}/health"
        wait_until(
            lambda: urllib.request.urlopen(health, timeout=2).status == 200,
            server,
            log,
            "mlflow server",
            timeout=180,
        )
        yield uri
    finally:
        stop(server)


def dvc_outs(repo: Path) -> list[str]:
    """Every output path dvc.lock records."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


def tree(root: Path, path: str) -> dict[str, bytes]:
    """The files of an output (a file or a folder), by path relative to the repository."""
    target = root / path
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


# The demo, shortened where nothing here looks: what this test checks is the server, the remote
# and the clone, not the figures (tests/test_full_dag.py runs the demo in full).
LIGHT = {"train.max_steps": 40, "judge.fraction": 0.25, "judge.prompts": 16}


@dataclass
class Team:
    backend: str
    backend_uri: str
    server: str
    artifacts: Path
    first: Path  # where the DAG ran
    clone: Path  # a `git clone` of it, filled by `dvc pull`
    # Command outputs, left out of the repr so that a failed assertion stays readable.
    repro: str = field(repr=False)  # `dvc repro` in the first copy
    leftover: str = field(repr=False)  # `git status --porcelain` after the commit
    status: str = field(repr=False)  # `dvc status` in the clone after `dvc pull`
    # `dvc repro` in the clone after `dvc pull`: its exit status, then its output.
    repro_clone: str = field(repr=False)
    client: MlflowClient = field(repr=False)
    # `dvc exp run --temp` in the clone with a second extra held-out set: its output, and the
    # experiment's metrics/eval.json.
    extra_set: str = field(repr=False)
    extra_set_metrics: dict = field(repr=False)


@pytest.fixture(scope="module", params=[BACKEND])
def team(request, tmp_path_factory, e2e_repo):
    """One DAG run against the server, pushed, cloned and pulled; every test reads its results."""
    backend = request.param
    top = tmp_path_factory.mktemp("team")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if backend == "postgresql":
            backend_uri = stack.enter_context(postgresql_database())
        else:
            backend_uri = f"sqlite:///{top / 'mlflow-server.db'}"
        print(f"\nMLflow server backend store: {backend} ({backend_uri})")
        artifacts = top / "artifacts"
        server = stack.enter_context(mlflow_server(backend_uri, artifacts, top / "mlflow.log"))

        # `dvc repro` with the demo's values written into params.yaml and committed, not
        # `python -m demo`: that is a `dvc exp run --temp`, whose results live in an
        # experiment ref (shared with `dvc exp push`), not in the workspace. Here they land in the
        # workspace and dvc.lock, which are what a team commits, pushes and pulls.
        first, env = e2e_repo("team-first", demo_params=True, **LIGHT)
        git(first, "commit", "-q", "-am", "the offline demo's params")
        env["MLFLOW_TRACKING_URI"] = server
        dvc = [sys.executable, "-m", "dvc"]
        repro = run(first, env, *dvc, "repro")

        # Share it as the README says: outputs to a DVC remote; dvc.lock, the remote's config and
        # the `cache: false` outputs (metrics/*.json, registry/registered.json) to git. DVC has
        # staged its .gitignore files (core.autostage); nothing may be left out of the commit.
        run(first, env, *dvc, "remote", "add", "-d", "storage", str(top / "dvc-remote"))
        run(first, env, *dvc, "push")
        git(first, "add", "dvc.lock", ".dvc/config", "metrics", "registry")
        git(first, "commit", "-q", "-m", "demo run")
        leftover = git(first, "status", "--porcelain")

        clone = top / "clone"
        git(top, "clone", "-q", str(first), str(clone))
        run(clone, env, *dvc, "pull")
        status = run(clone, env, *dvc, "status")
        # Not run(): a stage re-running here is this test's failure, reported by the test below.
        done = subprocess.run(
            [*dvc, "repro"], cwd=clone, env=env, capture_output=True, text=True, timeout=900
        )
        repro_clone = f"exit status {done.returncode}\n{done.stdout}{done.stderr}"
        # A teammate adds a second extra held-out set, as an experiment on the committed run.
        other = yaml.safe_load((clone / "params.yaml").read_text())["eval"]["datasets"][0]
        sets = f"[{{name: other, dataset: {other['dataset']}, split: test, size: 150, judge: 16}}, "
        sets += f"{{name: small, dataset: {other['dataset']}, split: test, size: 40}}]"
        extra = [*dvc, "exp", "run", "--temp", "-n", "extra-set", "-S", f"eval.datasets={sets}"]
        extra_set = run(clone, env, *extra)
        ref = git(clone, "for-each-ref", "--format=%(refname)", "refs/exps").split()
        ref = next(r for r in ref if r.endswith("/extra-set"))
        extra_metrics = json.loads(git(clone, "show", f"{ref}:metrics/eval.json"))
        print(f"team fixture: {time.monotonic() - started:.0f} s")
        yield Team(
            backend,
            backend_uri,
            server,
            artifacts,
            first,
            clone,
            repro,
            leftover,
            status,
            repro_clone,
            MlflowClient(tracking_uri=server, registry_uri=server),
            extra_set,
            extra_metrics,
        )


def the_run(team: Team):
    experiment = team.client.get_experiment_by_name("qwen3-dpo")
    assert experiment is not None, f"no experiment on the server {team.server}"
    runs = team.client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the clone's repro logged nothing
    return runs[0]


def test_every_stage_ran_and_logged_to_the_server_not_a_local_store(team) -> None:
    for stage in STAGES:
        assert f"Running stage '{stage}'" in team.repro, stage
    for local in ("mlflow.db", "mlruns", "mlartifacts"):
        assert not (team.first / local).exists(), local
    run_ = the_run(team)
    assert stored_run_ids(team.backend_uri) == {run_.info.run_id}  # in the backend store itself


def test_the_run_has_params_step_metrics_and_eval_metrics(team) -> None:
    run_ = the_run(team)
    params = run_.data.params
    assert params["model.name"].endswith(f"/{MODEL_FOLDER}") and float(params["train.lr"]) == 1e-3
    with (team.first / "plots/train.csv").open() as f:
        rows = list(csv.DictReader(f))
    history = team.client.get_metric_history(run_.info.run_id, "train/loss")
    assert len(history) == len(rows) > 0
    assert [m.step for m in history] == [int(r["step"]) for r in rows]
    evaluation = json.loads((team.first / "metrics/eval.json").read_text())
    for name in ("win_rate", "kendall_tau", "eval_loss"):
        assert run_.data.metrics[f"eval/{name}"] == pytest.approx(evaluation[name])


def test_the_policy_is_registered_as_champion_with_artifacts_on_the_server(team, tmp_path) -> None:
    import mlflow.artifacts

    run_ = the_run(team)
    champion = team.client.get_model_version_by_alias("qwen3-dpo", "champion")
    assert champion.run_id == run_.info.run_id
    assert len(team.client.search_model_versions("name='qwen3-dpo'")) == 1
    registered = json.loads((team.first / "registry/registered.json").read_text())
    assert registered["version"] == champion.version
    # The model's files went through the server's artifact proxy into --artifacts-destination,
    # and a teammate downloads them from the server.
    assert run_.info.artifact_uri.startswith("mlflow-artifacts:/"), run_.info.artifact_uri
    assert list(team.artifacts.rglob("MLmodel"))
    # Not a models:/ URI: download_artifacts resolves those in the default registry, not the
    # tracking_uri it is given, and setting MLFLOW_TRACKING_URI here would leak into other tests.
    source = team.client.get_model_version_download_uri("qwen3-dpo", champion.version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(tmp_path), tracking_uri=team.server
    )
    assert (Path(local) / "MLmodel").is_file()


def test_a_clone_pulls_every_output_and_reruns_nothing(team) -> None:
    assert team.leftover == "", f"not committed:\n{team.leftover}"
    assert "Data and pipelines are up to date." in team.status, team.status
    assert team.repro_clone.startswith("exit status 0\n"), team.repro_clone[-3000:]
    assert "Running stage" not in team.repro_clone, team.repro_clone[-3000:]
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in team.repro_clone, stage
    outs = dvc_outs(team.first)
    assert "models/policy" in outs and "metrics/eval.json" in outs
    for path in outs:
        pulled = tree(team.clone, path)
        assert pulled, f"{path} is missing from the clone"
        assert pulled == tree(team.first, path), path
    assert (team.clone / "metrics/eval.json").read_text() == (
        team.first / "metrics/eval.json"
    ).read_text()


def test_another_extra_set_reruns_only_the_stages_that_score_the_sets(team) -> None:
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in team.extra_set}
    assert ran == {"eval_sets", "evaluate", "judge_sets"}, team.extra_set[-3000:]
    for stage in set(STAGES) - ran:  # register among them: no copy of the version
        assert f"Stage '{stage}' didn't change, skipping" in team.extra_set, stage
    assert set(team.extra_set_metrics["sets"]) == {"other", "small"}
    assert team.extra_set_metrics["sets"]["small"]["pairs"] > 0
