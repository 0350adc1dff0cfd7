"""subsample: the held-out rule, determinism, sizes, and the streamed selection against a plain
in-memory reference (the rule as it was written before the stage streamed its input)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import PAIRS_SCHEMA, SUBSAMPLED_SCHEMA
from pipeline.data.subsample import subsample
from tests.helpers import pairs, read_pairs, source_rows, table


def split_rows() -> tuple[list[dict], list[dict]]:
    train = source_rows(40, 3) + source_rows(10, 2, site="superuser")
    # Eval shares questions 0-4 (same URL) with train, and qid 7 of another site (other URL).
    evaluation = (
        source_rows(20, 3, start=100)
        + source_rows(5, 2)
        + source_rows(1, 2, site="askubuntu", start=7)
    )
    return train, evaluation


def raw_folder(
    root: Path, train: list[dict] | pa.Table, evaluation: list[dict] | pa.Table, files: int = 1
) -> Path:
    """data/raw as download_data leaves it: each split cut into `files` parquet files."""
    for split, rows in (("train", train), ("eval", evaluation)):
        whole = rows if isinstance(rows, pa.Table) else pairs(table(rows))
        (root / split).mkdir(parents=True)
        size = math.ceil(len(whole) / files)
        for i in range(files):
            pq.write_table(whole.slice(i * size, size), root / split / f"part-{i:05d}.parquet")
    return root


def run(
    tmp_path: Path,
    fraction: float,
    source_rows_: int,
    eval_size: int,
    seed: int,
    rows: tuple | None = None,
    files: int = 1,
    batch_rows: int = 8192,
) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """subsample on `rows` (default split_rows()) -> (train, eval, counts) as written."""
    work = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    raw = raw_folder(work / "raw", *(rows or split_rows()), files=files)
    counts = subsample(raw, work / "out", fraction, source_rows_, eval_size, seed, batch_rows)
    written = [pq.read_table(work / "out" / s / "data.parquet") for s in ("train", "eval")]
    assert all(t.schema == SUBSAMPLED_SCHEMA for t in written)
    return written[0], written[1], counts


def test_no_question_in_both_splits(tmp_path: Path) -> None:
    sampled_train, sampled_eval, counts = run(tmp_path, 1.0, 140, 1000, 0)
    assert not set(sampled_train["question_id"].to_pylist()) & set(
        sampled_eval["question_id"].to_pylist()
    )
    assert counts["train_removed_eval_overlap"] == 15  # questions 0-4 of stackoverflow, 3 pairs
    # qid 7 of askubuntu is another question than qid 7 of stackoverflow: that one stays in train.
    assert "https://stackoverflow.com/questions/7" in set(sampled_train["question_id"].to_pylist())


def test_subsample_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = run(tmp_path, 0.5, 140, 20, seed=3)
    again = run(tmp_path, 0.5, 140, 20, seed=3)
    other = run(tmp_path, 0.5, 140, 20, seed=4)
    assert first[0].equals(again[0]) and first[1].equals(again[1]) and first[2] == again[2]
    assert not first[0].equals(other[0])


def test_fraction_applies_to_the_source_train_rows(tmp_path: Path) -> None:
    sampled, _, counts = run(tmp_path, 0.1, 1000, 20, seed=0)
    assert counts["train_target"] == 100 and len(sampled) == 100
    small, _, _ = run(tmp_path, 0.01, 140, 20, seed=0)
    assert len(small) == 2  # ceil(0.01 * 140)


def test_eval_keeps_whole_questions_until_eval_size(tmp_path: Path) -> None:
    _, sampled_eval, counts = run(tmp_path, 1.0, 140, 10, seed=1)
    assert 10 <= len(sampled_eval) < 13  # whole questions of 2-3 pairs: at most one over
    per_question: dict[str, int] = {}
    for row in sampled_eval.to_pylist():
        per_question[row["question_id"]] = per_question.get(row["question_id"], 0) + 1
    source_counts: dict[str, int] = {}
    for row in split_rows()[1]:
        source_counts[row["metadata"][0]] = source_counts.get(row["metadata"][0], 0) + 1
    assert all(per_question[q] == source_counts[q] for q in per_question)
    assert counts["eval_questions"] == len(per_question)


def test_pair_ids_are_unique_within_a_split(tmp_path: Path) -> None:
    for split in run(tmp_path, 1.0, 140, 1000, 0)[:2]:
        ids = split["pair_id"].to_pylist()
        assert len(ids) == len(set(ids))


# --- the streamed stage against the in-memory rule ------------------------------------------


def reference(
    train: list[dict],
    evaluation: list[dict],
    fraction: float,
    source: int,
    eval_size: int,
    seed: int,
) -> tuple[list[int], list[int]]:
    """The selection rule on plain lists -> (train row indices, eval row indices), in order:
    eval questions (sorted, then shuffled by the seeded generator) are taken whole until
    eval_size pairs; then ceil(fraction * source) rows are drawn from the train rows outside
    them, with the same generator."""
    rng = np.random.default_rng(seed)

    def key(row: dict) -> str:
        if "question_id" in row:
            return row["question_id"]
        return row["metadata"][0] if row["metadata"] and row["metadata"][0] else f"qid:{row['qid']}"

    questions = np.array(sorted({key(r) for r in evaluation}), dtype=object)
    rng.shuffle(questions)
    chosen: set[str] = set()
    for question in questions:
        if sum(key(r) in chosen for r in evaluation) >= eval_size:
            break
        chosen.add(question)
    eval_rows = [i for i, r in enumerate(evaluation) if key(r) in chosen]
    outside = [i for i, r in enumerate(train) if key(r) not in chosen]
    n = min(math.ceil(fraction * source), len(outside))
    picks = np.sort(rng.choice(len(outside), size=n, replace=False))
    return [outside[i] for i in picks], eval_rows


@pytest.mark.parametrize(("files", "batch_rows"), [(1, 8192), (3, 7), (5, 1)])
def test_streaming_picks_the_reference_rows_in_any_batching(
    tmp_path: Path, files: int, batch_rows: int
) -> None:
    train, evaluation = split_rows()
    for fraction, eval_size, seed in ((0.4, 20, 0), (1.0, 11, 5), (0.05, 1, 9)):
        got_train, got_eval, counts = run(
            tmp_path, fraction, 140, eval_size, seed, files=files, batch_rows=batch_rows
        )
        want_train, want_eval = reference(train, evaluation, fraction, 140, eval_size, seed)
        assert got_train["pair_id"].to_pylist() == want_train
        assert got_eval["pair_id"].to_pylist() == want_eval
        rows = pairs(table(train)).to_pylist()
        got = got_train.select(PAIRS_SCHEMA.names).to_pylist()
        assert got == [rows[i] for i in want_train]  # every column, unchanged
        assert counts["train"] == len(want_train) and counts["eval"] == len(want_eval)
        assert counts["train_questions"] == len(set(got_train["question_id"].to_pylist()))


def test_the_demo_set_gives_the_reference_pairs(tmp_path: Path, demo_dataset_dir: Path) -> None:
    """On the demo's fetched folders, with the demo's data params: the same pairs as the rule."""
    rl = read_pairs(demo_dataset_dir / "data" / "rl")
    evaluation = read_pairs(demo_dataset_dir / "data" / "evaluation")
    got_train, got_eval, _ = run(
        tmp_path, 1.0, len(rl), 300, 42, rows=(rl, evaluation), files=2, batch_rows=500
    )
    want_train, want_eval = reference(rl.to_pylist(), evaluation.to_pylist(), 1.0, len(rl), 300, 42)
    assert got_train["pair_id"].to_pylist() == want_train
    assert got_eval["pair_id"].to_pylist() == want_eval


def test_a_file_with_a_missing_column_is_named(tmp_path: Path) -> None:
    raw = raw_folder(tmp_path / "raw", *split_rows())
    broken = raw / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(broken).drop_columns(["context"]), broken)
    with pytest.raises(ValueError, match=r"part-00000.parquet: missing column 'context'"):
        subsample(raw, tmp_path / "out", 1.0, 140, 10, 0)
