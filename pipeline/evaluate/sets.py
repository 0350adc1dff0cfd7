"""Extra held-out sets (eval.datasets): how the policy does on preference data it was not
trained on. Each set is fetched in any format data.dataset reads, held out by whole prompts,
tokenized with the main split's settings and scored by the reference once, into
data/eval_sets/<name>/; evaluate then scores the policy on it as on the main held-out split."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import HfFileSystem
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.data.schema import load_tokenized
from pipeline.data.subsample import held_out_split, source_files
from pipeline.data.tokenization import tokenize_split
from pipeline.download.hub import reaching_the_hub
from pipeline.download.shards import fetch_split, list_shards, open_dataset
from pipeline.model import reference
from pipeline.model.loading import Runtime, freeze, pad_token_id
from pipeline.model.scoring import load_scorer, score_pairs
from pipeline.params import EvalSetParams, Params
from pipeline.stage_io import EVAL_SET_PAIRS, MODEL_BASE, eval_set

PAIRS = EVAL_SET_PAIRS


def fetch_set(spec: EvalSetParams, seed: int, out: Path) -> dict[str, Any]:
    """The set's held-out pairs -> out/pairs.parquet (SUBSAMPLED_SCHEMA) and their counts."""
    fs, root = open_dataset(spec.dataset, spec.revision)
    key = f"eval.datasets[{spec.name}].dataset"
    with (
        reaching_the_hub(key, spec.dataset)
        if isinstance(fs, HfFileSystem)
        else contextlib.nullcontext()
    ):
        try:
            shards = list_shards(fs, root, spec.split)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"eval.datasets[{spec.name}].split: {error}") from None
        manifest = fetch_split(fs, shards, spec.size, out / "raw", spec.columns)
    counts = held_out_split(source_files(out / "raw"), spec.size, seed, out / PAIRS)
    shutil.rmtree(out / "raw")
    return {"format": manifest["format"], "dropped": manifest["dropped"], **counts}


def prepare_set(
    spec: EvalSetParams,
    params: Params,
    tokenizer: PreTrainedTokenizerBase,
    model: Any,
    runtime: Runtime,
    pad: int,
    out: Path,
) -> dict[str, Any]:
    """Fetch, hold out, tokenize and reference-score one set into `out` -> its report."""
    out.mkdir(parents=True)
    tokenized, cache = (out / p.name for p in eval_set(spec.name))
    report = fetch_set(spec, params.data.seed, out)
    report["tokenize"] = tokenize_split(out / PAIRS, tokenized, tokenizer, params.tokenize)
    dataset = load_tokenized(tokenized)
    chosen, rejected = score_pairs(
        model, dataset, params.reference.batch_size, runtime, pad, f"reference {spec.name}"
    )
    identity = reference.describe(MODEL_BASE, tokenized, runtime, params.train.lora.quantize)
    reference.save(cache, np.stack([chosen, rejected], axis=1), identity)
    return report


def prepare_sets(params: Params, runtime: Runtime, out: Path) -> dict[str, dict[str, Any]]:
    """`prepare_set` of every set of eval.datasets into out/<name>/, the base model loaded once
    on `runtime` (where evaluate scores the policy) -> each set's report by name."""
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    model = freeze(load_scorer(MODEL_BASE, runtime, trust, params.train.lora.quantize))
    pad = pad_token_id(tokenizer)
    reports = {}
    for spec in params.eval.datasets:
        reports[spec.name] = prepare_set(
            spec, params, tokenizer, model, runtime, pad, out / spec.name
        )
        kept = reports[spec.name]["tokenize"]["pairs_kept"]
        print(f"{spec.name}: {kept} held-out pairs of {spec.dataset} ({spec.split})")
    return reports
