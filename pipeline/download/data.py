"""download_data's work: the train and held-out pairs data.* names, fetched shard by shard."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from huggingface_hub import HfFileSystem

from pipeline.download.hub import reaching_the_hub
from pipeline.download.shards import fetch_split, list_shards, open_dataset
from pipeline.params import DataParams


def fetch_data(params: DataParams, out_dir: Path) -> dict[str, object]:
    """download stage, data half: out_dir/{train,eval}/ plus a manifest per split.

    Writes into `out_dir` directly; the stage wraps it in atomic_dir so the pair lands at once.
    """
    fs, root = open_dataset(params.dataset, params.revision)
    hub = isinstance(fs, HfFileSystem)
    with reaching_the_hub("data.dataset", params.dataset) if hub else contextlib.nullcontext():
        train_shards = list_shards(fs, root, params.train_dir)
        eval_shards = list_shards(fs, root, params.eval_dir)
        train_needed = math.ceil(params.fraction * sum(s.rows for s in train_shards))
        return {
            "train": fetch_split(fs, train_shards, train_needed, out_dir / "train"),
            "eval": fetch_split(fs, eval_shards, params.eval_size, out_dir / "eval"),
        }


def describe_fetch(manifests: dict[str, dict[str, Any]]) -> str:
    """The stage's summary lines: rows and shards fetched per split."""
    return "\n".join(
        f"{split}: {m['rows_fetched']} rows from {len(m['shards'])} of {m['source_shards']} "
        f"shards ({m['rows_needed']} needed)"
        for split, m in manifests.items()
    )
