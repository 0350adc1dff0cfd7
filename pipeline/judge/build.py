"""The reward stage's work: train a reward model on the dataset's reward pairs, or adopt an
existing one (`judge.model`); either way measure its pair accuracy on the held-out pairs, with
its 95 % Wilson interval (pipeline/judge/trust.py).

No held-out question reaches the reward model's training pairs (the subsample stage's rule, by
question URL), so its held-out accuracy is a fair figure and it never judges answers to questions
it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.data.schema import read_split
from pipeline.download.model import fetch_model
from pipeline.download.shards import fetch_reward_pairs
from pipeline.judge.reward import (
    FORMAT_FILE,
    RewardFormat,
    load_reward_model,
    pair_accuracy,
    pair_rows,
    train_reward_model,
)
from pipeline.judge.trust import COIN, accuracy_interval, reliable
from pipeline.model.loading import Runtime, pad_token_id
from pipeline.model.positions import check_positions
from pipeline.params import ModelParams, Params, TokenizeParams
from pipeline.stage_io import DATA_SUBSAMPLED, MODEL_BASE, StageError
from pipeline.train.adapters import add_adapters


def reward_format(params: Params, tokenizer: PreTrainedTokenizerBase) -> RewardFormat:
    """The pipeline's own prompt (tokenize's template settings) for a reward model trained
    here; the model's chat template for one from judge.model (the pipeline's prompt when it
    has none). Lengths are the judge's: the prompt keeps at most half of judge.max_length."""
    length = params.judge.max_length
    prompt = TokenizeParams(
        template=params.tokenize.template,
        use_chat_template=params.tokenize.use_chat_template,
        max_length=length,
        max_prompt_length=min(params.tokenize.max_prompt_length, length // 2),
        max_drop_share=1.0,
        num_proc=1,
        pairs_per_shard=1,  # unused: no tokenize stage here
    )
    chat = bool(params.judge.model) and tokenizer.chat_template is not None
    return RewardFormat(prompt, length, chat)


def without_questions(table: pa.Table, held_out: pa.Table) -> tuple[pa.Table, int]:
    """`table` without the pairs of held-out questions -> (kept, removed count)."""
    held = held_out["question_id"].unique()
    overlap = pc.is_in(table["question_id"], value_set=held)
    kept = table.filter(pc.invert(overlap))
    return kept, len(table) - len(kept)


def without_policy_pairs(table: pa.Table) -> pa.Table:
    """The train split's rows (fetched from its first shard, as download_data fetches them, so a
    row's index is its pair_id) less those subsample gave the policy."""
    used = pq.read_table(DATA_SUBSAMPLED / "train" / "data.parquet", columns=["pair_id"])
    index = pa.array(np.arange(len(table)), pa.int64())
    return table.filter(pc.invert(pc.is_in(index, value_set=used["pair_id"])))


def train_reward(params: Params, held_out: pa.Table, runtime: Runtime, out: Path) -> dict[str, Any]:
    """Fetch judge.fraction of judge.reward_dir, drop held-out questions, train from models/base
    (a new scalar head, seeded; with judge.lora, adapters merged after), save to `out` -> report.
    judge.reward_dir "": the train split's pairs the policy does not train on."""
    trust = params.model.trust_remote_code
    split = params.judge.reward_dir or params.data.train_dir
    with tempfile.TemporaryDirectory() as fetched:
        manifest = fetch_reward_pairs(
            params.data.dataset,
            params.data.revision,
            split,
            params.judge.fraction,
            Path(fetched),
            params.data.columns,
        )
        # The shards hold more rows than the fraction asks for: train on the share asked.
        wanted = read_split(Path(fetched)).slice(0, manifest["rows_needed"])
        if not params.judge.reward_dir:
            wanted = without_policy_pairs(wanted)
        table, removed = without_questions(wanted, held_out)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    form = reward_format(params, tokenizer)
    pairs = pair_rows(table, tokenizer, form)
    if not pairs and not params.judge.reward_dir:
        raise StageError(
            f'judge.reward_dir "": no train pair of {params.data.dataset}/{split} is left for the '
            f"reward model ({len(table)} after removing the policy's pairs and {removed} of "
            "held-out questions); lower data.fraction, or name a split with judge.reward_dir"
        )
    if not pairs:
        raise StageError(
            f"judge.reward_dir: no usable pair in {params.data.dataset}/{params.judge.reward_dir} "
            f"({len(table)} pairs after removing {removed} of held-out questions, all with "
            "identical or empty answers)"
        )
    config = AutoConfig.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    check_positions(config, {"judge.max_length": params.judge.max_length}, trust)
    torch.manual_seed(params.judge.seed)  # the new head's initial weights
    model = load_reward_model(MODEL_BASE, runtime, trust, pad_token_id(tokenizer))
    if params.judge.lora.enabled:
        model = add_adapters(model, params.judge.lora, task_type="SEQ_CLS")
    history = train_reward_model(model, pairs, params.judge, runtime)
    if params.judge.lora.enabled:  # a plain model on disk: the judge needs no peft
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = _measure(model, tokenizer, form, held_out, params, runtime, out)
    return {
        **report,
        "train_pairs": len(pairs),
        "held_out_questions_removed": removed,
        "rows_fetched": manifest["rows_fetched"],
        "history": history,
    }


def adopt_reward(params: Params, held_out: pa.Table, runtime: Runtime, out: Path) -> dict[str, Any]:
    """judge.model: fetch it like the base model (safetensors only, no remote code unless
    model.trust_remote_code), check it is a reward model (one output), measure it -> report."""
    name = params.judge.model
    source = ModelParams(name, params.judge.revision, params.model.trust_remote_code, False)
    fetch_model(source, out, key="judge.model")
    config = AutoConfig.from_pretrained(out, trust_remote_code=source.trust_remote_code)
    architectures = config.architectures or []
    scalar = any(a.endswith("ForSequenceClassification") for a in architectures)
    if config.num_labels != 1 or not scalar:
        raise StageError(
            f"judge.model: {name!r} is not a reward model (a sequence-classification "
            f"model with one output; it has {config.num_labels} outputs, architectures "
            f'{architectures}); set judge.model: "" to train one on judge.reward_dir'
        )
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=source.trust_remote_code)
    policy_tokenizer = AutoTokenizer.from_pretrained(
        MODEL_BASE, trust_remote_code=source.trust_remote_code
    )
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        print(
            f"reward: {name}'s tokenizer is not the policy's; the judge hands it answers as "
            "text and it reads them with its own tokenizer"
        )
    model = load_reward_model(out, runtime, source.trust_remote_code, pad_token_id(tokenizer))
    form = reward_format(params, tokenizer)
    report = _measure(model, tokenizer, form, held_out, params, runtime, out)
    return {**report, "model": name}


def _measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    form: RewardFormat,
    held_out: pa.Table,
    params: Params,
    runtime: Runtime,
    out: Path,
) -> dict[str, Any]:
    """Held-out pair accuracy and its interval; the input format saved beside the model in
    `out`."""
    pairs = pair_rows(held_out, tokenizer, form)
    if not pairs:  # an accuracy of no pairs is NaN, and its interval says nothing
        raise StageError(
            f"reward: no held-out pair to measure the reward model on ({len(held_out)} held-out "
            "pairs, all with identical answers after truncation at judge.max_length)"
        )
    accuracy = pair_accuracy(model, pairs, params.judge.batch_size, runtime)
    (out / FORMAT_FILE).write_text(json.dumps(dataclasses.asdict(form), indent=2) + "\n")
    return {**accuracy_interval(accuracy, len(pairs)), "heldout_pairs": len(pairs)}


# metrics/reward.json: the accuracy and its interval (dvc exp show); the rest is in reports/.
HEADLINE = ("reward_accuracy", "reward_accuracy_low", "reward_accuracy_high")


def build_reward(params: Params, held_out: pa.Table, runtime: Runtime, out: Path) -> dict[str, Any]:
    """The judge's reward model into `out`: judge.model adopted, else one trained -> report."""
    build = adopt_reward if params.judge.model else train_reward
    return build(params, held_out, runtime, out)


def reward_line(params: Params, report: dict[str, Any]) -> str:
    """The reward stage's one line: where the model comes from and its held-out accuracy with
    its interval; said here, before any policy is judged with it, when the judge's figures will
    be marked unreliable."""
    source = params.judge.model or f"{report['train_pairs']} pairs of {params.judge.reward_dir}"
    warning = (
        ""
        if reliable(report["reward_accuracy_low"])
        else f"; lower end at or below {COIN}: the judge's figures will be marked unreliable"
    )
    return (
        f"reward model ({source}): held-out pair accuracy {report['reward_accuracy']:.4f} "
        f"[{report['reward_accuracy_low']:.4f}, {report['reward_accuracy_high']:.4f}] "
        f"on {report['heldout_pairs']} pairs{warning}"
    )
