"""Fetch pairs: only the shards a fraction of a folder needs, from the hub or a local copy.

The hub repository and a local folder laid out like it go through the same code: both are an
fsspec filesystem plus a root (HfFileSystem reads parquet footers with range requests, so counting
rows costs kilobytes, not the 22 GB of the full repository).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import fsspec
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec.callbacks import TqdmCallback
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub import HfFileSystem

from pipeline.data.schema import SOURCE_SCHEMA, check_schema, conform
from pipeline.download.hub import local_folder, reaching_the_hub
from pipeline.stage_io import StageError, bar, write_json_atomic

SHARD_SUFFIXES = (".parquet", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str  # path inside the filesystem
    rows: int


def open_dataset(dataset: str, revision: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve `data.dataset` to (filesystem, root folder of the repository layout)."""
    layout = (
        "a folder laid out like the hub repository (<train_dir>/*.parquet|*.jsonl and "
        "<eval_dir>/*.parquet|*.jsonl)"
    )
    local = local_folder("data.dataset", dataset, layout)
    if local is not None:
        return LocalFileSystem(), str(local)
    return HfFileSystem(), f"datasets/{dataset}@{revision}"


def list_shards(fs: fsspec.AbstractFileSystem, root: str, folder: str) -> list[Shard]:
    """Every parquet/jsonl file under root/folder, sorted by name, with its row count."""
    paths = sorted(p for p in fs.ls(f"{root}/{folder}", detail=False) if p.endswith(SHARD_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"no .parquet or .jsonl files in {root}/{folder}")
    return [Shard(p, _count_rows(fs, p)) for p in bar(paths, desc=f"count {folder}", leave=False)]


def _count_rows(fs: fsspec.AbstractFileSystem, path: str) -> int:
    with fs.open(path, "rb") as f:
        if path.endswith(".parquet"):
            parquet = pq.ParquetFile(f)
            check_schema(parquet.schema_arrow, SOURCE_SCHEMA, path)
            return parquet.metadata.num_rows
        return sum(1 for line in f if line.strip())


def shards_for(shards: list[Shard], rows_needed: int) -> list[Shard]:
    """The shortest prefix of `shards` holding at least `rows_needed` rows (all if too few).

    The hub data is globally shuffled, so a prefix of shards is as good as a random subset.
    """
    chosen, total = [], 0
    for shard in shards:
        if total >= rows_needed:
            break
        chosen.append(shard)
        total += shard.rows
    return chosen


def fetch_split(
    fs: fsspec.AbstractFileSystem, shards: list[Shard], rows_needed: int, out_dir: Path
) -> dict[str, object]:
    """Copy the shards covering `rows_needed` rows into out_dir as validated parquet files."""
    chosen = shards_for(shards, rows_needed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, shard in enumerate(bar(chosen, desc=f"fetch {out_dir.name}", unit="shard")):
        _fetch_shard(fs, shard, out_dir / f"part-{index:05d}.parquet")
    manifest = {
        "source_rows": sum(s.rows for s in shards),
        "source_shards": len(shards),
        "rows_needed": rows_needed,
        "rows_fetched": sum(s.rows for s in chosen),
        "shards": [s.path for s in chosen],
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def _fetch_shard(fs: fsspec.AbstractFileSystem, shard: Shard, dest: Path) -> None:
    origin = shard.path
    if shard.path.endswith(".jsonl"):
        with fs.open(shard.path, "rb") as f:
            table = pa_json.read_json(f)
        pq.write_table(conform(table, SOURCE_SCHEMA, origin), dest)
        return
    callback = TqdmCallback(
        tqdm_kwargs={"desc": Path(shard.path).name, "unit": "B", "unit_scale": True, "leave": False}
    )
    fs.get_file(shard.path, str(dest), callback=callback)
    schema = pq.read_schema(dest)
    check_schema(schema, SOURCE_SCHEMA, origin)
    if not schema.equals(SOURCE_SCHEMA, check_metadata=False):
        # Same values, other physical types (large_string, int32, extra columns): normalise.
        pq.write_table(conform(pq.read_table(dest), SOURCE_SCHEMA, origin), dest)


def fetch_reward_pairs(
    dataset: str, revision: str, reward_dir: str, fraction: float, out_dir: Path
) -> dict[str, object]:
    """The reward model's pairs: the shards of `reward_dir` (in data.dataset) that `fraction` of
    its pairs needs, into out_dir, with a manifest. A dataset without that folder is an error
    naming judge.reward_dir and the ways out."""
    fs, root = open_dataset(dataset, revision)
    hub = isinstance(fs, HfFileSystem)
    with reaching_the_hub("data.dataset", dataset) if hub else contextlib.nullcontext():
        try:
            shards = list_shards(fs, root, reward_dir)
        except FileNotFoundError as error:
            raise StageError(
                f"judge.reward_dir: no reward pairs in {dataset}/{reward_dir} ({error}); set "
                "judge.reward_dir to the folder that holds them, or judge.model to an existing "
                "reward model (a hub id or local folder)"
            ) from None
        return fetch_split(fs, shards, math.ceil(fraction * sum(s.rows for s in shards)), out_dir)
