"""Where the stages read and write, relative to the repository root (dvc.yaml uses the same)."""

from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")
MODEL_BASE = Path("models/base")
MODEL_POLICY = Path("models/policy")
DATA_RAW = Path("data/raw")
DATA_SUBSAMPLED = Path("data/subsampled")
DATA_TOKENIZED = Path("data/tokenized")
DATA_REFERENCE = Path("data/reference")
REPORTS = Path("reports")
METRICS = Path("metrics")
PLOTS = Path("plots")
# Name of the resolved-params file saved beside every artifact.
RESOLVED_PARAMS = "resolved_params.json"


def asset_cache_dir() -> Path:
    """Cache for the locally built demo model and dataset (like the hub's download cache)."""
    default = Path.home() / ".cache" / "dpo-qwen3"
    return Path(os.environ.get("DPO_QWEN3_CACHE", default))


CHECKPOINTS = Path("checkpoints/train")
REGISTRY = Path("registry")
