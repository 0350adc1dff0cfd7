"""Fetch pairs: only the shards a fraction of a split needs, from the hub or a local copy, each
turned into PAIRS_SCHEMA rows as it lands.

The hub repository and a local folder laid out like it go through the same code: both are an
fsspec filesystem plus a root (HfFileSystem reads parquet footers with range requests, so counting
rows costs kilobytes, not the 22 GB of the full repository).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec.callbacks import TqdmCallback
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub import HfFileSystem
from tqdm import tqdm

from pipeline.data.formats import PairFormat, detect, normalize
from pipeline.data.schema import PAIRS_SCHEMA, SchemaError
from pipeline.download.hub import local_folder, reaching_the_hub
from pipeline.params import ColumnsParams
from pipeline.stage_io import StageError, bar, write_json_atomic

# Data files a split may hold; text formats may be gzipped (Anthropic/hh-rlhf's train.jsonl.gz).
SHARD_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
BATCH_ROWS = 8192  # rows normalized at a time: a shard is never held whole
NAMED_DROPS = 10  # bad rows named one by one; the rest are counted


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str  # path inside the filesystem
    rows: int


def open_dataset(dataset: str, revision: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve `data.dataset` to (filesystem, root folder of the repository layout)."""
    layout = (
        "a folder laid out like a hub dataset (<split>/*.parquet, data/<split>-*.parquet, "
        "<split>.jsonl, ...)"
    )
    local = local_folder("data.dataset", dataset, layout)
    if local is not None:
        return LocalFileSystem(), str(local)
    return HfFileSystem(), f"datasets/{dataset}@{revision}"


def split_files(fs: fsspec.AbstractFileSystem, root: str, split: str) -> list[str]:
    """The files of one split, sorted: every data file of the folder root/split, else the hub's
    split layout (data/<split>-*.<ext>, <split>-*.<ext>, <split>.<ext>)."""
    if fs.isdir(f"{root}/{split}"):
        return sorted(
            p for p in fs.ls(f"{root}/{split}", detail=False) if p.endswith(SHARD_SUFFIXES)
        )
    for suffix in SHARD_SUFFIXES:
        for pattern in (f"data/{split}-*", f"data/{split}", f"{split}-*", split):
            found = sorted(fs.glob(f"{root}/{pattern}{suffix}"))
            if found:
                return found
    return []


def list_shards(fs: fsspec.AbstractFileSystem, root: str, split: str) -> list[Shard]:
    """Every data file of the split `split`, sorted by name, with its row count."""
    paths = split_files(fs, root, split)
    if not paths:
        raise FileNotFoundError(
            f"no split {split!r} in {root}: looked for {split}/*, data/{split}-*, {split}-* and "
            f"{split}.* as {', '.join(SHARD_SUFFIXES)}"
        )
    return [Shard(p, _count_rows(fs, p)) for p in bar(paths, desc=f"count {split}", leave=False)]


def _kind(path: str | Path) -> str:
    """A data file's format: parquet, jsonl, json or csv (gzipped or not)."""
    return str(path).removesuffix(".gz").rsplit(".", 1)[-1]


def _count_rows(fs: fsspec.AbstractFileSystem, path: str) -> int:
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as f:
        if _kind(path) == "parquet":
            return pq.ParquetFile(f).metadata.num_rows
        if _kind(path) == "jsonl":
            return sum(1 for line in f if line.strip())
    with tempfile.TemporaryDirectory() as scratch:  # .json and .csv: read to count
        local = Path(scratch) / Path(path).name
        fs.get_file(path, str(local))
        return sum(len(b) for b in _read_batches(local))


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
    fs: fsspec.AbstractFileSystem,
    shards: list[Shard],
    rows_needed: int,
    out_dir: Path,
    columns: ColumnsParams,
) -> dict[str, object]:
    """Copy the shards covering `rows_needed` rows into out_dir as PAIRS_SCHEMA parquet files;
    rows that cannot be pairs are dropped, counted in the manifest and named on stderr."""
    chosen = shards_for(shards, rows_needed)
    out_dir.mkdir(parents=True, exist_ok=True)
    dropped: Counter[str] = Counter()
    offset, formats = 0, set()
    for index, shard in enumerate(bar(chosen, desc=f"fetch {out_dir.name}", unit="shard")):
        dest = out_dir / f"part-{index:05d}.parquet"
        form, reasons = _fetch_shard(fs, shard, dest, columns)
        formats.add(form.name)
        _name_drops(out_dir.name, shard, offset, reasons, sum(dropped.values()))
        dropped.update(r for r in reasons if r)
        offset += len(reasons)
    manifest = {
        "format": sorted(formats),
        "source_rows": sum(s.rows for s in shards),
        "source_shards": len(shards),
        "rows_needed": rows_needed,
        "rows_fetched": offset - sum(dropped.values()),
        "dropped": dict(dropped),
        "shards": [s.path for s in chosen],
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def _name_drops(split: str, shard: Shard, offset: int, reasons: list[str], before: int) -> None:
    bad = [(i, r) for i, r in enumerate(reasons) if r]
    for count, (i, reason) in enumerate(bad, start=before):
        if count < NAMED_DROPS:
            name = Path(shard.path).name
            tqdm.write(f"{split} row {offset + i} ({name} row {i}) dropped: {reason}", sys.stderr)
        elif count == NAMED_DROPS:
            tqdm.write(f"{split}: more rows dropped, counted in its manifest.json", sys.stderr)


def _fetch_shard(
    fs: fsspec.AbstractFileSystem, shard: Shard, dest: Path, columns: ColumnsParams
) -> tuple[PairFormat, list[str]]:
    """One shard to `dest` as PAIRS_SCHEMA parquet, batch by batch -> (its format, one drop
    reason per source row, "" for kept)."""
    callback = TqdmCallback(
        tqdm_kwargs={"desc": Path(shard.path).name, "unit": "B", "unit_scale": True, "leave": False}
    )
    source = dest.with_name(f".{dest.stem}-source.{Path(shard.path).name}")
    fs.get_file(shard.path, str(source), callback=callback)
    reasons: list[str] = []
    try:
        with pq.ParquetWriter(dest, PAIRS_SCHEMA) as writer:
            form = None
            for batch in _read_batches(source):
                form = form or _detect(batch.schema, columns, shard.path)
                table, why = normalize(batch, form)
                writer.write_table(table)
                reasons += why
    finally:
        source.unlink()
    return form or _detect(pa.schema([]), columns, shard.path), reasons


def _detect(schema: pa.Schema, columns: ColumnsParams, origin: str) -> PairFormat:
    try:
        return detect(schema.names, columns)
    except StageError as error:
        raise SchemaError(f"{origin}: {error}") from None


def _read_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """A data file's rows, a batch at a time (a .json array is read whole: it has no lines).
    pyarrow reads a .gz file's text through gzip itself."""
    kind = _kind(path)
    if kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(BATCH_ROWS)
    elif kind == "csv":
        yield from pa_csv.open_csv(path)
    elif kind == "json" and _is_array(path):
        with pa.input_stream(path, compression="detect") as f:
            rows = json.loads(f.read())
        yield from pa.Table.from_pylist(rows).to_batches(BATCH_ROWS)
    else:
        yield from pa_json.read_json(path).to_batches(BATCH_ROWS)


def _is_array(path: Path) -> bool:
    with pa.input_stream(path, compression="detect") as f:
        return f.read(256).lstrip()[:1] == b"["


def fetch_reward_pairs(
    dataset: str,
    revision: str,
    reward_dir: str,
    fraction: float,
    out_dir: Path,
    columns: ColumnsParams,
) -> dict[str, object]:
    """The reward model's pairs: the shards of `reward_dir` (in data.dataset) that `fraction` of
    its pairs needs, into out_dir, with a manifest. A dataset without that split is an error
    naming judge.reward_dir and the ways out."""
    fs, root = open_dataset(dataset, revision)
    hub = isinstance(fs, HfFileSystem)
    with reaching_the_hub("data.dataset", dataset) if hub else contextlib.nullcontext():
        try:
            shards = list_shards(fs, root, reward_dir)
        except FileNotFoundError as error:
            raise StageError(
                f"judge.reward_dir: no reward pairs in {dataset}/{reward_dir} ({error}); set "
                'judge.reward_dir to the split that holds them ("": the train pairs the policy '
                "does not use), or judge.model to an existing reward model (a hub id or local "
                "folder)"
            ) from None
        needed = math.ceil(fraction * sum(s.rows for s in shards))
        return fetch_split(fs, shards, needed, out_dir, columns)
