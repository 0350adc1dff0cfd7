"""Deterministic train/eval subsample with no question in both splits.

Evaluation keeps whole questions (Kendall's tau ranks all answers of a question), train draws
pairs. Train pairs whose question is in evaluation are removed first, so held-out means held out.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.schema import SUBSAMPLED_SCHEMA, question_key


def with_ids(table: pa.Table) -> pa.Table:
    """Append `question_id` (URL, else qid) and `pair_id` (row index in the fetched split)."""
    keys = [
        question_key(q, m)
        for q, m in zip(table["qid"].to_pylist(), table["metadata"].to_pylist(), strict=True)
    ]
    table = table.append_column("question_id", pa.array(keys, pa.string()))
    table = table.append_column("pair_id", pa.array(np.arange(len(table)), pa.int64()))
    return table.cast(SUBSAMPLED_SCHEMA)


def sample_eval(table: pa.Table, eval_size: int, rng: np.random.Generator) -> pa.Table:
    """Whole questions, in a seeded random order, until at least `eval_size` pairs are taken."""
    questions = np.array(sorted(set(table["question_id"].to_pylist())), dtype=object)
    rng.shuffle(questions)
    counts = table.group_by("question_id").aggregate([("pair_id", "count")]).to_pydict()
    per_question = dict(zip(counts["question_id"], counts["pair_id_count"], strict=True))
    chosen, total = [], 0
    for question in questions:
        if total >= eval_size:
            break
        chosen.append(question)
        total += per_question[question]
    mask = pc.is_in(table["question_id"], value_set=pa.array(chosen, pa.string()))
    return table.filter(mask)


def sample_train(table: pa.Table, n_pairs: int, rng: np.random.Generator) -> pa.Table:
    """`n_pairs` pairs drawn without replacement, kept in their original order."""
    n_pairs = min(n_pairs, len(table))
    rows = np.sort(rng.choice(len(table), size=n_pairs, replace=False))
    return table.take(pa.array(rows))


def subsample(
    train: pa.Table,
    evaluation: pa.Table,
    fraction: float,
    source_train_rows: int,
    eval_size: int,
    seed: int,
) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Return (train, eval, counts). `fraction` applies to the whole source train folder."""
    rng = np.random.default_rng(seed)
    train, fetched_eval = with_ids(train), with_ids(evaluation)
    evaluation = sample_eval(fetched_eval, eval_size, rng)
    held_out = pc.is_in(train["question_id"], value_set=evaluation["question_id"].unique())
    disjoint = train.filter(pc.invert(held_out))
    target = math.ceil(fraction * source_train_rows)
    sampled = sample_train(disjoint, target, rng)
    counts = {
        "train_fetched": len(train),
        "train_removed_eval_overlap": len(train) - len(disjoint),
        "train_target": target,
        "train": len(sampled),
        "eval_fetched": len(fetched_eval),
        "eval": len(evaluation),
        "eval_questions": len(evaluation["question_id"].unique()),
        "train_questions": len(sampled["question_id"].unique()),
    }
    return sampled, evaluation, counts
