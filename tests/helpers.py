"""Small builders for tests: source-schema tables and hub-layout folders."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.schema import SOURCE_SCHEMA


def source_rows(
    n_questions: int, pairs_per_question: int, site: str = "stackoverflow", start: int = 0
) -> list[dict]:
    rows = []
    for q in range(start, start + n_questions):
        url = f"https://{site}.com/questions/{q}"
        for p in range(pairs_per_question):
            rows.append(
                {
                    "qid": q,
                    "question": f"How do I sort list number {q}?",
                    "date": "2015/01/02",
                    "metadata": [url, f"{url}/answer/{p}"],
                    "response_j": f"Use `sorted()`: good answer {p} to {q}.",
                    "response_k": f"No idea, answer {p} for {q}.",
                }
            )
    return rows


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


def hub_layout(root: Path, train: list[list[dict]], evaluation: list[list[dict]]) -> Path:
    """A folder laid out like the hub repository: every file named train-*, one per shard."""
    for folder, shards in (("data/rl", train), ("data/evaluation", evaluation)):
        (root / folder).mkdir(parents=True)
        for i, rows in enumerate(shards):
            pq.write_table(
                table(rows), root / folder / f"train-{i:05d}-of-{len(shards):05d}.parquet"
            )
    return root


def tiny_qwen3(vocab_size: int = 96, seed: int = 0):
    """A 2-layer Qwen3 with random weights, for tests that need a real causal LM quickly."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return Qwen3ForCausalLM(config).eval()


class NoTokenizer:
    """What save_policy needs of a tokenizer, for the tiny models that have none."""

    def save_pretrained(self, folder: Path) -> None:
        pass


def random_pairs(n: int, vocab_size: int = 96, seed: int = 0):
    """A datasets.Dataset of tokenized pairs with random ids and varied lengths."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return rng.integers(1, vocab_size, size=int(rng.integers(lo, hi))).tolist()

    return datasets.Dataset.from_dict(
        {
            "question_id": [f"q{i // 2}" for i in range(n)],
            "pair_id": list(range(n)),
            "prompt_input_ids": [ids(3, 9) for _ in range(n)],
            "chosen_input_ids": [ids(2, 12) for _ in range(n)],
            "rejected_input_ids": [ids(2, 12) for _ in range(n)],
        }
    )


def train_params(**overrides):
    """TrainParams for small tests: plain DPO on the CPU, no warmup, a log row every step and no
    checkpoint unless asked; any field can be overridden."""
    from pipeline.params import TrainParams

    settings = {
        "lr": 1e-3,
        "epochs": 1,
        "batch_size": 4,
        "grad_accum": 1,
        "beta": 0.1,
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_steps": 0,
        "seed": 0,
        "cached_reference": False,
        "length_grouping": True,
        "device": "cpu",
        "nproc": 1,
        "parallel": "ddp",
        "log_every": 1,
        "save_every": 10**9,
        "max_tokens_per_micro_batch": 0,
        "gradient_checkpointing": False,
    }
    return TrainParams(**{**settings, **overrides})
