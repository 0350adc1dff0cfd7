"""Pairs of texts -> token ids, with the prompt and each completion tokenized separately.

Tokenizing separately means no token ever merges across the prompt/answer boundary, so the
completion log-probs DPO needs are exactly the completion's own tokens. No special token is added
by the tokenizer (Qwen has no BOS; the chat template writes its own markers once), and EOS is
appended to every completion once, before truncation.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from pipeline.data import bpe
from pipeline.data.prompts import Context, completion_heads, encode_prompts
from pipeline.data.schema import SUBSAMPLED_SCHEMA, TOKENIZED_SCHEMA, check_schema
from pipeline.data.tokenize_report import LENGTHS, kept_lengths, split_report
from pipeline.params import TokenizeParams
from pipeline.stage_io import StageError, bar
from pipeline.stopping import default_stop_signals

# An answer needs at least one token plus EOS; less room than this drops the pair.
MIN_COMPLETION_TOKENS = 2
TASK_PAIRS = 1024  # pairs a worker tokenizes per task
WORKERS_FROM = 2000  # pairs; below, worker start-up (about a second) costs more than it saves
TOKENIZED_ARROW = datasets.Features.from_arrow_schema(TOKENIZED_SCHEMA).arrow_schema
# The workers' rows: the tokenized columns, then why a pair is dropped and what was cut.
FLAGS_SCHEMA = pa.schema([("drop_reason", pa.string()), ("truncated", pa.list_(pa.bool_()))])
MAPPED = pa.schema([*TOKENIZED_ARROW, *FLAGS_SCHEMA], metadata=TOKENIZED_ARROW.metadata)
_JOB: tuple[PreTrainedTokenizerBase, TokenizeParams] | None = None  # forked workers read it


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
    """Columns of subsampled rows -> ids plus drop reason and truncation flags, by column."""
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


class TooManyDropped(StageError, ValueError):
    """More of a split was dropped than tokenize.max_drop_share allows."""


def tokenize_split(
    source: Path, out_dir: Path, tokenizer: PreTrainedTokenizerBase, params: TokenizeParams
) -> dict[str, Any]:
    """Tokenize one subsampled parquet split into Arrow shards at `out_dir`; return its report.

    Streamed, so memory does not grow with the split: the parquet file is read a task of pairs
    at a time, `params.num_proc` worker processes tokenize the tasks, and the kept pairs are
    written as they come, `pairs_per_shard` a shard, in a scratch folder beside `out_dir` that
    becomes it once complete (nothing is left on failure or Ctrl-C). Raises TooManyDropped
    naming the split and reasons."""
    check_schema(pq.read_schema(source), SUBSAMPLED_SCHEMA, str(source))
    split = out_dir.name
    if not params.use_chat_template:
        _no_conversations(source, split)
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{split}-scratch-", dir=out_dir.parent) as scratch:
        shards, flags, lengths = _Shards(Path(scratch) / split, params.pairs_per_shard), [], []
        for batch in _tokenized(source, tokenizer, params, split):
            kept = batch.filter(pc.equal(batch["drop_reason"], "")).select(TOKENIZED_SCHEMA.names)
            flags.append(batch.select(["drop_reason", "truncated"]))
            lengths.append([pc.list_value_length(kept[f"{n}_input_ids"]) for n in LENGTHS])
            shards.add(kept)
        report = split_report(pa.Table.from_batches(flags, FLAGS_SCHEMA), kept_lengths(lengths))
        if report["drop_share"] > params.max_drop_share:
            raise TooManyDropped(
                f"tokenize {split}: dropped {report['drop_share']:.1%} of pairs "
                f"(> tokenize.max_drop_share {params.max_drop_share:.1%}): {report['dropped']}"
            )
        seconds = time.perf_counter() - started  # worker start-up included, as users see it
        report["pairs_per_s"] = round(report["pairs_in"] / seconds, 1)
        report["shards"] = shards.save(out_dir)
    return report


def _tokenized(
    source: Path, tokenizer: PreTrainedTokenizerBase, params: TokenizeParams, split: str
) -> Iterator[pa.RecordBatch]:
    """The split's rows tokenized, a task at a time and in order (TOKENIZED_SCHEMA's columns,
    then drop_reason and truncated), by `params.num_proc` forked workers when the split is
    large enough. At most two tasks per worker wait, so reading never runs ahead of them."""
    global _JOB
    parquet = pq.ParquetFile(source)
    tasks = parquet.iter_batches(batch_size=TASK_PAIRS, columns=SUBSAMPLED_SCHEMA.names)
    rows = parquet.metadata.num_rows
    procs = params.num_proc if params.num_proc > 1 and rows >= WORKERS_FROM else 1
    bpe.encoder(tokenizer)  # built and checked here once: forked workers inherit it
    _JOB = (tokenizer, params)
    show = bar(total=rows, desc=f"tokenize {split} ({procs} processes)", unit="pair")
    try:
        for result in _in_order(tasks, procs):
            show.update(result.num_rows)
            yield result
    finally:
        show.close()
        _JOB = None


def _in_order(tasks: Iterator[pa.RecordBatch], procs: int) -> Iterator[pa.RecordBatch]:
    if procs == 1:
        yield from map(_tokenize_task, tasks)
        return
    with multiprocessing.get_context("fork").Pool(procs, default_stop_signals) as pool:
        waiting: collections.deque[Any] = collections.deque()
        for task in tasks:
            waiting.append(pool.apply_async(_tokenize_task, (task,)))
            while waiting and (len(waiting) > 2 * procs or waiting[0].ready()):
                yield waiting.popleft().get()
        while waiting:
            yield waiting.popleft().get()


def _tokenize_task(rows: pa.RecordBatch) -> pa.RecordBatch:
    tokenizer, params = _JOB
    return pa.RecordBatch.from_pydict(tokenize_batch(rows.to_pydict(), tokenizer, params), MAPPED)


class _Shards:
    """Kept pairs written straight into the files of the saved dataset, `size` pairs a file, in a
    folder that becomes the split once all are written. (`Dataset.save_to_disk` would read every
    pair back through one memory map of the whole split, and keep its pages in memory.)"""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        self.files: list[tuple[Path, int]] = []  # written so far, and their pairs
        self.rows, self.writer = 0, None  # the open file's pairs and its writer
        folder.mkdir()

    def add(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self.writer is None:
                self._open()
            take = min(batch.num_rows, self.size - self.rows)
            self.writer.write_batch(batch.slice(0, take))
            self.rows, batch = self.rows + take, batch.slice(take)
            self.files[-1] = (self.files[-1][0], self.rows)
            if self.rows == self.size:
                self.writer = self.writer.close()

    def _open(self) -> None:
        path = self.folder / f"part-{len(self.files):05d}.arrow"
        self.writer, self.rows = pa.ipc.new_stream(str(path), TOKENIZED_ARROW), 0
        self.files.append((path, 0))

    def save(self, out_dir: Path) -> int:
        """Name the files as `save_to_disk` does, describe them as it does, and move the folder
        to `out_dir`; return the number of files (at least one: an empty split has one)."""
        if not self.files:
            self._open()
        if self.writer is not None:
            self.writer = self.writer.close()
        names = [f"data-{i:05d}-of-{len(self.files):05d}.arrow" for i in range(len(self.files))]
        for (path, _), name in zip(self.files, names, strict=True):
            path.rename(self.folder / name)
        _describe(self.folder, names, [rows for _, rows in self.files])
        self.folder.rename(out_dir)
        return len(names)


def _describe(folder: Path, names: list[str], rows: list[int]) -> None:
    """state.json and dataset_info.json for these files, as `save_to_disk` writes them (its own
    output for an empty dataset of the same columns, then the files listed)."""
    empty = datasets.Dataset(TOKENIZED_ARROW.empty_table())
    with tempfile.TemporaryDirectory(dir=folder) as described:
        bars_shown = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # an empty save's bar would only be noise
        try:
            empty.save_to_disk(described)
        finally:
            if bars_shown:
                datasets.enable_progress_bars()
        state = json.loads((Path(described) / "state.json").read_text(encoding="utf-8"))
        state["_data_files"] = [{"filename": name} for name in names]
        state["_fingerprint"] = hashlib.sha256(json.dumps([names, rows]).encode()).hexdigest()[:16]
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        (Path(described) / "dataset_info.json").rename(folder / "dataset_info.json")


def _no_conversations(source: Path, split: str) -> None:
    """Raise before any work when a split holds conversations and the template cannot show them."""
    turns = pc.list_value_length(pq.read_table(source, columns=["context"])["context"])
    first = pc.index(pc.greater(turns, 0), True).as_py()
    if first >= 0:
        raise StageError(
            f"tokenize {split}: pair {first} has a system turn or earlier turns, which "
            "tokenize.template cannot show; set tokenize.use_chat_template: true"
        )
