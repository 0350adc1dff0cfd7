"""Deterministic train/eval subsample with no question in both splits, in bounded memory.

Evaluation keeps whole questions (Kendall's tau ranks all answers of a question), train draws
pairs. Train pairs whose question is in evaluation are removed first, so held-out means held out.

Both splits are read twice in record batches, never whole: a first pass over the key column
(question_id) finds each row's question; the seeded choice is made on row indices; a second
pass writes the chosen rows batch by batch. Memory grows with 8 bytes per fetched train row (the
index of every row outside the held-out questions) and with question ids (the eval split's, and
the distinct ones written, for the counts), not with the texts. pyarrow's own Parquet reader
does the streaming: the stages already read and write its files, and it yields the rows of each
file in order, which the seeded choice relies on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.schema import PAIRS_SCHEMA, SUBSAMPLED_SCHEMA, check_schema

BATCH_ROWS = 8192  # rows per record batch: a few tens of MB of stack-exchange texts
KEY_COLUMNS = ["question_id"]


def question_ids(rows: pa.Table | pa.RecordBatch) -> pa.Array:
    """Each row's prompt identity (download_data wrote it)."""
    column = rows["question_id"]
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def source_files(folder: Path) -> list[Path]:
    """A fetched split's parquet files in reading order, each checked against PAIRS_SCHEMA."""
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {folder}: run the download stage first")
    for f in files:
        check_schema(pq.read_schema(f), PAIRS_SCHEMA, str(f))
    return files


def batches(
    files: list[Path], columns: list[str], batch_rows: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """The split's rows in order, `batch_rows` at a time, `columns` cast to the source types."""
    schema = pa.schema([PAIRS_SCHEMA.field(c) for c in columns])
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_rows, columns=columns):
            yield batch.select(columns).cast(schema)


def key_column(files: list[Path], batch_rows: int = BATCH_ROWS) -> pa.ChunkedArray:
    """Every row's question id, in order (first pass)."""
    return pa.chunked_array(
        [question_ids(b) for b in batches(files, KEY_COLUMNS, batch_rows)], pa.string()
    )


def sample_eval(keys: pa.ChunkedArray, eval_size: int, rng: np.random.Generator) -> pa.Array:
    """Whole questions, in a seeded random order, until at least `eval_size` pairs are taken:
    the chosen question ids."""
    counts = pc.value_counts(keys)
    per_question = dict(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
    )
    questions = np.array(sorted(per_question), dtype=object)
    rng.shuffle(questions)
    chosen, total = [], 0
    for question in questions:
        if total >= eval_size:
            break
        chosen.append(question)
        total += per_question[question]
    return pa.array(chosen, pa.string())


def sample_train(outside: np.ndarray, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """`n_pairs` of the row indices `outside` drawn without replacement, in increasing order."""
    n_pairs = min(n_pairs, len(outside))
    return outside[np.sort(rng.choice(len(outside), size=n_pairs, replace=False))]


def rows_outside(
    files: list[Path], held_out: pa.Array, batch_rows: int = BATCH_ROWS
) -> tuple[np.ndarray, int]:
    """First pass over train: (indices of the rows whose question is not held out, rows read)."""
    kept, offset = [], 0
    for batch in batches(files, KEY_COLUMNS, batch_rows):
        inside = pc.is_in(question_ids(batch), value_set=held_out).to_numpy(zero_copy_only=False)
        kept.append(np.flatnonzero(~inside) + offset)
        offset += len(batch)
    return np.concatenate(kept) if kept else np.empty(0, np.int64), offset


def write_rows(files: list[Path], rows: np.ndarray, out: Path, batch_rows: int = BATCH_ROWS) -> int:
    """Second pass: the rows at the increasing indices `rows`, with their ids, to the parquet
    file `out`, batch by batch -> the number of distinct questions written."""
    questions, offset = [], 0
    with pq.ParquetWriter(out, SUBSAMPLED_SCHEMA) as writer:
        for batch in batches(files, PAIRS_SCHEMA.names, batch_rows):
            lo, hi = np.searchsorted(rows, [offset, offset + len(batch)])
            if hi > lo:
                taken = batch.take(pa.array(rows[lo:hi] - offset))
                ids = question_ids(taken)
                pair_ids = pa.array(rows[lo:hi], pa.int64())
                writer.write_batch(
                    pa.RecordBatch.from_arrays([*taken.columns, pair_ids], schema=SUBSAMPLED_SCHEMA)
                )
                questions.append(pc.unique(ids))
            offset += len(batch)
    return len(pc.unique(pa.chunked_array(questions, pa.string()))) if questions else 0


def held_out_split(files: list[Path], size: int, seed: int, out: Path) -> dict[str, int]:
    """Whole prompts of the split `files`, in a seeded order, until `size` pairs -> the parquet
    file `out` (SUBSAMPLED_SCHEMA) and its counts: an extra held-out set (eval.datasets)."""
    keys = key_column(files)
    chosen = sample_eval(keys, size, np.random.default_rng(seed))
    rows = np.flatnonzero(pc.is_in(keys, value_set=chosen).to_numpy(zero_copy_only=False))
    questions = write_rows(files, rows, out)
    return {"fetched": len(keys), "pairs": len(rows), "questions": questions}


def subsample(
    raw: Path,
    out: Path,
    fraction: float,
    source_train_rows: int,
    eval_size: int,
    seed: int,
    batch_rows: int = BATCH_ROWS,
) -> dict[str, int]:
    """raw/{train,eval}/*.parquet -> out/{train,eval}/data.parquet; returns the counts.
    `fraction` applies to the whole source train folder."""
    rng = np.random.default_rng(seed)
    train_files, eval_files = source_files(raw / "train"), source_files(raw / "eval")
    eval_keys = key_column(eval_files, batch_rows)
    held_out = sample_eval(eval_keys, eval_size, rng)
    eval_rows = np.flatnonzero(
        pc.is_in(eval_keys, value_set=held_out).to_numpy(zero_copy_only=False)
    )
    outside, fetched = rows_outside(train_files, held_out, batch_rows)
    target = math.ceil(fraction * source_train_rows)
    train_rows = sample_train(outside, target, rng)
    for split in ("train", "eval"):
        (out / split).mkdir(parents=True)
    train_questions = write_rows(
        train_files, train_rows, out / "train" / "data.parquet", batch_rows
    )
    eval_questions = write_rows(eval_files, eval_rows, out / "eval" / "data.parquet", batch_rows)
    return {
        "train_fetched": fetched,
        "train_removed_eval_overlap": fetched - len(outside),
        "train_target": target,
        "train": len(train_rows),
        "eval_fetched": len(eval_keys),
        "eval": len(eval_rows),
        "eval_questions": eval_questions,
        "train_questions": train_questions,
    }
