"""Pairs of texts -> token ids, with the prompt and each completion tokenized separately.

Tokenizing separately means no token ever merges across the prompt/answer boundary, so the
completion log-probs DPO needs are exactly the completion's own tokens. No special token is added
by the tokenizer (Qwen has no BOS; the chat template writes its own markers once), and EOS is
appended to every completion once, before truncation.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from pipeline.data import bpe
from pipeline.data.prompts import Context, completion_heads, encode_prompts
from pipeline.data.schema import SUBSAMPLED_SCHEMA, check_schema, tokenized_features
from pipeline.params import TokenizeParams
from pipeline.stage_io import StageError

# An answer needs at least one token plus EOS; less room than this drops the pair.
MIN_COMPLETION_TOKENS = 2
DROP_REASONS = ("empty_completion", "identical_completions", "no_room_for_answer")


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    drop_reason: str  # "" when kept, else one of DROP_REASONS
    truncated: tuple[bool, bool, bool]  # prompt, chosen, rejected


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str | None],
    chosen: list[str | None],
    rejected: list[str | None],
    params: TokenizeParams,
    contexts: list[Context] | None = None,
) -> list[TokenizedPair]:
    """Tokenize pairs (one tokenizer call per column) and decide which are kept. `contexts`:
    each prompt's turns before its question (PAIRS_SCHEMA's context; none: single questions)."""
    prompts = encode_prompts(tokenizer, [q or "" for q in questions], params, contexts)
    # One token past the room each prompt leaves: enough to keep and to tell truncation.
    wanted = [max(params.max_length - len(ids), 0) + 1 for ids, _ in prompts]
    chosen_ids = completion_heads(tokenizer, [c or "" for c in chosen], wanted)
    rejected_ids = completion_heads(tokenizer, [r or "" for r in rejected], wanted)
    return [
        _decide(*parts, params)
        for parts in zip(prompts, chosen, rejected, chosen_ids, rejected_ids, strict=True)
    ]


def _decide(
    prompt: tuple[list[int], bool],
    chosen: str | None,
    rejected: str | None,
    full_chosen: list[int],
    full_rejected: list[int],
    params: TokenizeParams,
) -> TokenizedPair:
    """Cut the completions to the room the prompt leaves, or say why the pair is dropped.
    `full_*`: each completion's ids, or at least its first room + 1 of them."""
    ids, prompt_cut = prompt
    if not (chosen or "").strip() or not (rejected or "").strip():
        return TokenizedPair(ids, [], [], "empty_completion", (prompt_cut, False, False))
    room = params.max_length - len(ids)
    if room < MIN_COMPLETION_TOKENS:
        return TokenizedPair(ids, [], [], "no_room_for_answer", (prompt_cut, False, False))
    kept_chosen, kept_rejected = full_chosen[:room], full_rejected[:room]
    reason = "identical_completions" if kept_chosen == kept_rejected else ""
    truncated = (prompt_cut, len(full_chosen) > room, len(full_rejected) > room)
    return TokenizedPair(ids, kept_chosen, kept_rejected, reason, truncated)


def tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, params: TokenizeParams
) -> dict[str, list[Any]]:
    """datasets.map(batched=True) function: texts -> ids plus drop reason and truncation flags."""
    pairs = tokenize_pairs(
        tokenizer, batch["question"], batch["chosen"], batch["rejected"], params, batch["context"]
    )
    return {
        "question_id": batch["question_id"],
        "pair_id": batch["pair_id"],
        "prompt_input_ids": [p.prompt for p in pairs],
        "chosen_input_ids": [p.chosen for p in pairs],
        "rejected_input_ids": [p.rejected for p in pairs],
        "drop_reason": [p.drop_reason for p in pairs],
        "truncated": [list(p.truncated) for p in pairs],
    }


def split_report(table: Any, lengths: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts by drop reason, truncation counts and token-length percentiles of kept pairs, from
    the mapped Arrow table's drop_reason and truncated columns (Arrow compute: no Python row)."""
    reasons = pc.value_counts(table["drop_reason"])
    counts = dict(
        zip(reasons.field("values").to_pylist(), reasons.field("counts").to_pylist(), strict=True)
    )
    pairs, dropped = len(table), {reason: counts.get(reason, 0) for reason in DROP_REASONS}
    truncated = {
        name: int(pc.sum(pc.list_element(table["truncated"], i)).as_py() or 0)
        for i, name in enumerate(("prompt", "chosen", "rejected"))
    }
    return {
        "pairs_in": pairs,
        "pairs_kept": pairs - sum(dropped.values()),
        "dropped": dropped,
        "truncated": truncated,
        "drop_share": sum(dropped.values()) / max(pairs, 1),
        "lengths": {name: percentiles(values) for name, values in lengths.items()},
    }


def percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    points = np.percentile(np.asarray(values), [50, 90, 99])
    return {
        "p50": float(points[0]),
        "p90": float(points[1]),
        "p99": float(points[2]),
        "max": float(max(values)),
        "mean": float(np.mean(values)),
    }


class TooManyDropped(StageError, ValueError):
    """More of a split was dropped than tokenize.max_drop_share allows."""


def tokenize_dataset(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    params: TokenizeParams,
    split: str,
    cache: Path | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Tokenize a datasets.Dataset of subsampled rows; return (kept rows, report).

    Runs across `params.num_proc` processes. With a `cache` folder the mapped rows are written
    there (memory-mapped Arrow files) instead of held in memory. Raises TooManyDropped naming
    the split and reasons.
    """
    # The tokenized schema, plus two columns the drop report reads before they are dropped.
    features = datasets.Features(
        {
            **tokenized_features(),
            "drop_reason": datasets.Value("string"),
            "truncated": datasets.List(datasets.Value("bool")),
        }
    )
    bpe.encoder(tokenizer)  # built and checked here once: forked map workers inherit it
    tokenized = dataset.map(
        tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=_procs(params, len(dataset)),
        remove_columns=dataset.column_names,
        features=features,
        fn_kwargs={"tokenizer": tokenizer, "params": params},
        desc=f"tokenize {split}",
        cache_file_name=str(cache / f"{split}-mapped.arrow") if cache else None,
        keep_in_memory=cache is None,
        # Named here, not hashed: datasets would otherwise pickle the tokenizer (a 151k-token
        # vocabulary) to fingerprint every map job, for a cache this stage never reuses.
        new_fingerprint=f"tokenize-{split}-{dataset._fingerprint}",
    )
    table = tokenized.data.table  # the map's own output: no indices mapping to apply
    kept_rows = np.flatnonzero(pc.equal(table["drop_reason"], "").to_numpy(zero_copy_only=False))
    kept = tokenized.select(kept_rows).remove_columns(["drop_reason", "truncated"])
    lengths = {
        name: pc.list_value_length(table[f"{name}_input_ids"]).to_numpy()[kept_rows]
        for name in ("prompt", "chosen", "rejected")
    }
    lengths["pair_total"] = lengths["prompt"] + np.maximum(lengths["chosen"], lengths["rejected"])
    report = split_report(table, lengths)
    if report["drop_share"] > params.max_drop_share:
        raise TooManyDropped(
            f"tokenize {split}: dropped {report['drop_share']:.1%} of pairs "
            f"(> tokenize.max_drop_share {params.max_drop_share:.1%}): {report['dropped']}"
        )
    return kept, report


def _procs(params: TokenizeParams, rows: int) -> int | None:
    # Worker start-up costs about a second; not worth it for small splits.
    return params.num_proc if params.num_proc > 1 and rows >= 2000 else None


def tokenize_split(
    source: Path, out_dir: Path, tokenizer: PreTrainedTokenizerBase, params: TokenizeParams
) -> dict[str, Any]:
    """Tokenize one subsampled parquet split into Arrow shards at `out_dir`; return its report.

    Never the whole split in memory: the parquet file is converted to a memory-mapped Arrow file
    and mapped batch by batch into another, both in a scratch folder beside `out_dir` that is
    removed afterwards (also on failure or Ctrl-C)."""
    check_schema(pq.read_schema(source), SUBSAMPLED_SCHEMA, str(source))
    split = out_dir.name
    if not params.use_chat_template:
        _no_conversations(source, split)
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{split}-scratch-", dir=out_dir.parent) as scratch:
        dataset = datasets.Dataset.from_parquet(
            str(source),
            features=datasets.Features.from_arrow_schema(SUBSAMPLED_SCHEMA),
            cache_dir=scratch,
            columns=SUBSAMPLED_SCHEMA.names,
        )
        kept, report = tokenize_dataset(dataset, tokenizer, params, split, Path(scratch))
        seconds = time.perf_counter() - started  # worker start-up included, as users see it
        report["pairs_per_s"] = round(report["pairs_in"] / seconds, 1)
        report["shards"] = max(1, math.ceil(len(kept) / params.pairs_per_shard))
        kept.save_to_disk(str(out_dir), num_shards=report["shards"])
    return report


def _no_conversations(source: Path, split: str) -> None:
    """Raise before any work when a split holds conversations and the template cannot show them."""
    turns = pc.list_value_length(pq.read_table(source, columns=["context"])["context"])
    first = pc.index(pc.greater(turns, 0), True).as_py()
    if first >= 0:
        raise StageError(
            f"tokenize {split}: pair {first} has a system turn or earlier turns, which "
            "tokenize.template cannot show; set tokenize.use_chat_template: true"
        )


def describe_report(report: dict[str, dict[str, Any]]) -> str:
    """The stage's summary lines, one per split."""
    return "\n".join(
        f"{split}: kept {r['pairs_kept']}/{r['pairs_in']} pairs in {r['shards']} shards, "
        f"dropped {r['dropped']}, truncated {r['truncated']}, {r['pairs_per_s']} pairs/s"
        for split, r in report.items()
    )
