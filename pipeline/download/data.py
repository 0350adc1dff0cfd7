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

    With no eval split (data.eval_dir ""), eval is fetched from the train split's first shards:
    subsample then holds its questions out of train, so the held-out share is carved out of it.
    Writes into `out_dir` directly; the stage wraps it in atomic_dir so the pair lands at once.
    """
    fs, root = open_dataset(params.dataset, params.revision)
    hub = isinstance(fs, HfFileSystem)
    with reaching_the_hub("data.dataset", params.dataset) if hub else contextlib.nullcontext():
        train_shards = list_shards(fs, root, params.train_dir)
        eval_shards = list_shards(fs, root, params.eval_dir) if params.eval_dir else train_shards
        train_needed = math.ceil(params.fraction * sum(s.rows for s in train_shards))
        if not params.eval_dir:  # the held-out questions leave train: fetch enough for both
            train_needed = min(train_needed + params.eval_size, sum(s.rows for s in train_shards))
        columns = params.columns
        return {
            "train": fetch_split(fs, train_shards, train_needed, out_dir / "train", columns),
            "eval": fetch_split(fs, eval_shards, params.eval_size, out_dir / "eval", columns),
        }


def describe_fetch(manifests: dict[str, dict[str, Any]]) -> str:
    """The stage's summary lines: rows and shards fetched per split."""
    return "\n".join(
        f"{split}: {m['rows_fetched']} pairs ({', '.join(m['format'])}) from "
        f"{len(m['shards'])} of {m['source_shards']} shards ({m['rows_needed']} needed)"
        + (f", dropped {m['dropped']}" if m["dropped"] else "")
        for split, m in manifests.items()
    )
