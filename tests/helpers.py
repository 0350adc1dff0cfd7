"""Shared test constants and small builders: stack-exchange-paired tables and their pair records,
hub-layout folders, a tiny Qwen3, random tokenized pairs, train params."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from demo.dataset import SOURCE_SCHEMA
from pipeline.data.formats import detect, normalize
from pipeline.data.schema import SUBSAMPLED_SCHEMA
from pipeline.data.tokenization import TokenizedPair, tokenize_pairs
from pipeline.model.loading import Runtime
from pipeline.objective.metrics import STEP_METRIC_KEYS, step_metric_means
from pipeline.params import ColumnsParams

REPO = Path(__file__).resolve().parents[1]  # the repository under test
CPU = Runtime(torch.device("cpu"), None)  # fp32 on the CPU, no autocast


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
    """Rows in stack-exchange-paired's schema, as the hub (and the demo) hold them."""
    return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


def pairs(source: pa.Table) -> pa.Table:
    """A stack-exchange-paired table as download_data leaves it (PAIRS_SCHEMA rows)."""
    return normalize(source, detect(source.schema.names, NO_COLUMNS))[0]


NO_COLUMNS = ColumnsParams(prompt="", chosen="", rejected="", system="", id="")


def read_pairs(folder: Path) -> pa.Table:
    """Every parquet file of a stack-exchange-paired folder, as download_data leaves them."""
    return pairs(pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet"))))


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


def compile_layers_aot_eager(model: torch.nn.Module) -> int:
    """`compile_layers` with torch.compile's aot_eager backend: dynamo's graphs and AOTAutograd
    as in a compiled run, without inductor's C++ builds (a minute per new graph on 2 cores;
    tests/test_compile.py runs inductor on the plain layers)."""
    from pipeline.model.loading import compile_layers

    original = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, **kw: original(self, backend="aot_eager", **kw)
    try:
        return compile_layers(model)
    finally:
        torch.nn.Module.compile = original


class NoTokenizer:
    """What save_policy needs of a tokenizer, for the tiny models that have none."""

    def save_pretrained(self, folder: Path) -> None:
        pass


def random_pairs(n: int, vocab_size: int = 96, seed: int = 0):
    """A datasets.Dataset of tokenized pairs with random ids and varied lengths."""
    import datasets
    import numpy as np

    from pipeline.data.schema import tokenized_features

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
        },
        features=tokenized_features(),  # the tokenize stage's column types
    )


def train_params(**overrides):
    """params.yaml's train section made small for tests: plain DPO on the CPU, no warmup, a log
    row every step and no checkpoint unless asked; any field can be overridden. A new train
    setting takes its params.yaml value here, so adding one touches no test."""
    import dataclasses

    from pipeline.params import load_params

    small = {
        "lr": 1e-3,
        "epochs": 1,
        "batch_size": 4,
        "seed": 0,
        "warmup_ratio": 0.0,
        "cached_reference": False,
        "device": "cpu",
        "log_every": 1,
        "save_every": 10**9,
        "max_tokens_per_micro_batch": 0,
    }
    return dataclasses.replace(load_params(REPO / "params.yaml").train, **{**small, **overrides})


def objective(variant: str, beta: float, **settings):
    """LossParams as params.yaml would hold them for `variant` (simpo: reference-free)."""
    from pipeline.params import REFERENCE_FREE, LossParams

    return LossParams(variant, beta, reference_free=variant in REFERENCE_FREE, **settings)


def loss_params(**overrides):
    """params.yaml's loss section (plain DPO unless it says otherwise) with `overrides`."""
    import dataclasses

    from pipeline.params import load_params

    return dataclasses.replace(load_params(REPO / "params.yaml").loss, **overrides)


def fit(policy, reference, dataset, params, runtime, pad_token_id, folder, key, loss=None, **hooks):
    """Train with the train stage's own recipe (checkpoints in `folder` under run key `key`) and
    return it: `.log`, `.epoch_losses`, `.step`, `.summary()`. Without `loss`, params.yaml's,
    reference-free exactly when `reference` is None."""
    from pipeline.train.checkpoint import Slot
    from pipeline.train.recipe import DPORecipe, Hooks, Inputs

    loss = loss or loss_params(reference_free=reference is None)
    inputs = Inputs(policy, reference, dataset, pad_token_id)
    recipe = DPORecipe(inputs, params, loss, runtime, Slot(folder, key), Hooks(**hooks))
    recipe.train()
    return recipe


def apply_overrides(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Write dotted-key overrides into a params file (of a throwaway copy of the repository)."""
    import yaml

    tree = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = tree
        for part in path:  # nested sections too: train.lora.enabled
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            raise KeyError(f"demo override {key} is not a key of {params_file}")
        node[name] = value
    params_file.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")


def input_context(dataset_input: Any) -> str:
    """The context (training, evaluation) an MLflow run's dataset input was logged with."""
    return next(tag.value for tag in dataset_input.tags if tag.key == "mlflow.data.context")


def tokenize_pair(
    tokenizer: Any, question: str | None, chosen: str | None, rejected: str | None, params: Any
) -> TokenizedPair:
    """`tokenize_pairs` of one pair."""
    return tokenize_pairs(tokenizer, [question], [chosen], [rejected], params)[0]


def step_metrics(*args: torch.Tensor) -> dict[str, float]:
    """`step_metric_means` as plain numbers keyed by `STEP_METRIC_KEYS`."""
    return dict(zip(STEP_METRIC_KEYS, step_metric_means(*args).tolist(), strict=True))


def with_ids(table: pa.Table) -> pa.Table:
    """PAIRS_SCHEMA rows with `pair_id` (the row index), as subsample writes them."""
    table = table.append_column("pair_id", pa.array(range(len(table)), pa.int64()))
    return table.cast(SUBSAMPLED_SCHEMA)
