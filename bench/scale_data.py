"""The bench's generated sets: the demo generator's stack-exchange-paired layout at any size,
rewritten in place as TRL conversational parquet or HH-rlhf jsonl when asked."""

from __future__ import annotations

import json
from pathlib import Path

PAIRS_PER_QUESTION = 5.5  # the demo generator's mean


def generate(folder: Path, pairs: int, form: str) -> None:
    """`pairs` train pairs (about) and ~2,000 held-out pairs in the hub layout, seeded, in the
    format `form`."""
    from demo.dataset import SampleSize, generate_stack_exchange_sample

    questions = max(1, round(pairs / PAIRS_PER_QUESTION))
    size = SampleSize(
        train_questions=questions,
        eval_questions=400,
        reward_questions=10,
        train_shards=max(4, pairs // 50_000),
    )
    generate_stack_exchange_sample(folder, seed=0, size=size)
    if form != "stack-exchange":
        for shard in sorted((folder / "data").rglob("*.parquet")):
            rewrite(shard, form)


def rewrite(shard: Path, form: str) -> None:
    """A stack-exchange-paired shard as TRL conversational parquet or HH-rlhf jsonl, in place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(shard, columns=["question", "response_j", "response_k"]).to_pylist()
    shard.unlink()
    if form == "hh":
        with open(shard.with_suffix(".jsonl"), "w", encoding="utf-8") as out:
            for r in rows:
                sides = {
                    side: f"\n\nHuman: {r['question']}\n\nAssistant: {r[column]}"
                    for side, column in (("chosen", "response_j"), ("rejected", "response_k"))
                }
                out.write(json.dumps(sides) + "\n")
        return
    turns = [
        {
            side: [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r[column]},
            ]
            for side, column in (("chosen", "response_j"), ("rejected", "response_k"))
        }
        for r in rows
    ]
    pq.write_table(pa.Table.from_pylist(turns), shard)
