"""Shared fixtures: the offline demo assets, built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("asset-cache")


@pytest.fixture(scope="session")
def demo_model_dir(asset_cache: Path) -> Path:
    from pipeline.demo.model import ensure_demo_model

    return ensure_demo_model(asset_cache)


@pytest.fixture(scope="session")
def demo_dataset_dir(asset_cache: Path) -> Path:
    from pipeline.demo.dataset import ensure_demo_dataset

    return ensure_demo_dataset(asset_cache)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A writable copy of the committed params.yaml."""
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    return target
