"""The benchmark's workload: a Qwen3 of a chosen shape with random weights and the real Qwen3
vocabulary, long text pairs built from the demo's answers, and a workspace laid out as the stages
leave it (models/base, data/tokenized/train), so the pipeline rows run the train stage's path."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = 151_936
# Qwen3-0.6B's and a Qwen3-4B-shaped config, built here with random weights; "tiny" is the CPU
# benchmark model.
MODEL_SHAPES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    ),
    "qwen3-4b": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    ),
}
TEMPLATE = "Question: {question}\n\nAnswer:\n"  # ends on a newline: no token merges at the seam
MAX_LENGTH = 512


def make_workspace(workdir: Path, n_pairs: int, seed: int = 0, model: str = "tiny") -> None:
    """models/base, long text pairs in pairs.json, and the pairs as the tokenize stage writes
    them in data/tokenized/train. `model` is a shape of MODEL_SHAPES (a Qwen3 with random
    weights, the full vocabulary and the demo tokenizer) or a local model folder, copied as is
    (its own weights and tokenizer: a real model)."""
    import shutil

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from demo.dataset import ensure_demo_dataset

    cache = workdir / "cache"
    if model in MODEL_SHAPES:
        _random_qwen3(workdir / "models/base", cache, model, seed)
    else:
        shutil.copytree(Path(model), workdir / "models/base")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "models/base")
    table = pq.read_table(ensure_demo_dataset(cache) / "data/rl").to_pylist()
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):  # long answers: several demo answers joined, 100-480 tokens
        rows = rng.sample(table, 12)
        target = rng.randint(100, 480)
        chosen = _grow(tokenizer, [r["response_j"] for r in rows], target)
        rejected = _grow(tokenizer, [r["response_k"] for r in rows], rng.randint(60, target))
        pairs.append(
            {
                "prompt": TEMPLATE.format(question=rows[0]["question"]),
                "chosen": chosen,
                "rejected": rejected,
            }
        )
    (workdir / "pairs.json").write_text(json.dumps(pairs))
    write_tokenized(workdir)


def _random_qwen3(folder: Path, cache: Path, shape: str, seed: int) -> None:
    """A Qwen3 of MODEL_SHAPES[shape] with random weights, the full vocabulary and the demo's
    tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from demo.model import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(cache))
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        **MODEL_SHAPES[shape],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_tokenized(workdir: Path) -> None:
    """data/tokenized/train as the tokenize stage writes it (its schema, one question per pair)."""
    import datasets

    from pipeline.data.schema import tokenized_features

    rows = [
        {"question_id": f"q{i}", "pair_id": i, **row}
        for i, row in enumerate(tokenized_rows(workdir))
    ]
    split = datasets.Dataset.from_list(rows, features=tokenized_features())
    split.save_to_disk(str(workdir / "data/tokenized/train"))


def _grow(tokenizer, parts: list[str], target: int) -> str:
    text = parts[0]
    for part in parts[1:]:
        if len(tokenizer(text + "\n\n" + part)["input_ids"]) > target:
            break
        text = text + "\n\n" + part
    return text


def tokenized_rows(workdir: Path) -> list[dict[str, list[int]]]:
    """The pairs as this pipeline tokenizes them (prompt and completion apart, EOS appended)."""
    from transformers import AutoTokenizer

    from pipeline.data.prompts import encode, encode_completion

    tokenizer = AutoTokenizer.from_pretrained(workdir / "models/base")
    return [
        {
            "prompt_input_ids": encode(tokenizer, p["prompt"]),
            "chosen_input_ids": encode_completion(tokenizer, p["chosen"]),
            "rejected_input_ids": encode_completion(tokenizer, p["rejected"]),
        }
        for p in json.loads((workdir / "pairs.json").read_text())
    ]
