"""The offline demo: generated pairs, a tiny Qwen3 and the command that runs the DAG on them
(`python -m demo`). Not part of the pipeline: the stages see only the ordinary local folders it
builds."""

import os
from pathlib import Path


def asset_cache_dir() -> Path:
    """Cache for the locally built demo model and dataset (like the hub's download cache)."""
    default = Path.home() / ".cache" / "dpo-qwen3"
    return Path(os.environ.get("DPO_QWEN3_CACHE", default))
