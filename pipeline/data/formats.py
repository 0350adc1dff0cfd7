"""Preference formats: which columns hold the prompt and the two answers, told from the columns,
and each row turned into one PAIRS_SCHEMA record.

Known without a word from the user:
* stack-exchange-paired: `qid, question, metadata, response_j, response_k` (response_j preferred;
  a question's identity is its URL, metadata[0], else its qid);
* TRL's explicit prompt: `prompt, chosen, rejected`, each text (standard) or a list of
  `{role, content}` messages (conversational), with an optional `system` and `prompt_id`
  (ultrafeedback_binarized's chosen lists repeat the prompt's user turn: it is the same prompt);
* TRL's implicit prompt: `chosen, rejected` only, the prompt being what they share: messages up to
  the last assistant turn, an HH-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") up to
  its last Assistant turn, or else the text they start with.

Anything else is named column by column with `data.columns`. A row that cannot be a pair (a
malformed message list, a conversation that does not end with an assistant answer, answers that
differ before their last turn) is dropped, counted and named by split and row; an empty or
identical answer is tokenize's to drop and count, as for every format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline.data.schema import PAIRS_SCHEMA
from pipeline.params import ColumnsParams
from pipeline.stage_io import StageError

Turn = dict[str, str]
ROLES = ("system", "user", "assistant")
STACK_EXCHANGE = ("qid", "question", "metadata", "response_j", "response_k")
KNOWN = (
    "stack-exchange-paired (qid, question, metadata, response_j, response_k); "
    "explicit prompt (prompt, chosen, rejected: text or {role, content} messages; optional "
    "system, prompt_id); implicit prompt (chosen, rejected: messages, HH-rlhf transcripts or "
    "texts sharing their start)"
)
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class FormatError(StageError, ValueError):
    """Columns whose preference format cannot be told; the message names them."""


@dataclasses.dataclass(frozen=True)
class PairFormat:
    name: str
    chosen: str
    rejected: str
    prompt: str = ""  # "": implicit, shared by chosen and rejected
    system: str = ""
    identity: Callable[[dict[str, Any]], str | None] = lambda row: None
    id_columns: tuple[str, ...] = ()  # what `identity` reads

    def columns(self) -> list[str]:
        named = (self.prompt, self.chosen, self.rejected, self.system, *self.id_columns)
        return list(dict.fromkeys(c for c in named if c))


def _stack_exchange_id(row: dict[str, Any]) -> str:
    metadata = row.get("metadata")
    return metadata[0] if metadata and metadata[0] else f"qid:{row['qid']}"


def _column_id(column: str) -> Callable[[dict[str, Any]], str | None]:
    return lambda row: None if row.get(column) is None else str(row[column])


def detect(names: list[str], columns: ColumnsParams) -> PairFormat:
    """The format of a table with columns `names`: `data.columns` where it names any, else told
    from the names. FormatError names the columns found and the formats known."""
    present = set(names)
    if any(dataclasses.astuple(columns)):
        return _mapped(columns, names)
    if present.issuperset(STACK_EXCHANGE):
        return PairFormat(
            "stack-exchange-paired",
            chosen="response_j",
            rejected="response_k",
            prompt="question",
            identity=_stack_exchange_id,
            id_columns=("qid", "metadata"),
        )
    system = "system" if "system" in present else ""
    ids = ("prompt_id",) if "prompt_id" in present else ()
    identity = _column_id("prompt_id") if ids else (lambda row: None)
    if present.issuperset({"prompt", "chosen", "rejected"}):
        return PairFormat("explicit prompt", "chosen", "rejected", "prompt", system, identity, ids)
    if present.issuperset({"chosen", "rejected"}):
        return PairFormat("implicit prompt", "chosen", "rejected", "", system, identity, ids)
    raise FormatError(
        f"cannot tell the preference format of columns {names}; known: {KNOWN}. "
        "Name yours with data.columns (e.g. -S data.columns.prompt=question "
        "-S data.columns.chosen=good -S data.columns.rejected=bad)"
    )


def _mapped(columns: ColumnsParams, names: list[str]) -> PairFormat:
    """data.columns' format: the columns it names, the usual names for the roles it leaves ""."""
    present = set(names)
    chosen, rejected = columns.chosen or "chosen", columns.rejected or "rejected"
    prompt = columns.prompt or ("prompt" if "prompt" in present else "")
    system = columns.system or ("system" if "system" in present else "")
    roles = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": system}
    for role, column in {**roles, "id": columns.id}.items():
        if column and column not in present:
            raise FormatError(f"data.columns.{role}: no column {column!r}; found columns {names}")
    identity = _column_id(columns.id) if columns.id else (lambda row: None)
    ids = (columns.id,) if columns.id else ()
    return PairFormat("data.columns", chosen, rejected, prompt, system, identity, ids)


def normalize(table: pa.Table | pa.RecordBatch, form: PairFormat) -> tuple[pa.Table, list[str]]:
    """PAIRS_SCHEMA rows of `table` -> (rows kept, one reason per row dropped, "" for kept)."""
    data = table.select(form.columns()).to_pylist()
    records, reasons = [], []
    for row in data:
        pair = _pair(row, form)
        if isinstance(pair, str):
            reasons.append(pair)
            continue
        context, question, chosen, rejected = pair
        identity = form.identity(row) or _prompt_id(context, question)
        records.append((identity, context, question, chosen, rejected))
        reasons.append("")
    arrays = [list(column) for column in zip(*records, strict=True)] or [[]] * 5
    return pa.table(arrays, schema=PAIRS_SCHEMA), reasons


def _prompt_id(context: list[Turn], question: str | None) -> str:
    text = json.dumps([context, question], ensure_ascii=False, sort_keys=True)
    return "prompt:" + hashlib.sha1(text.encode()).hexdigest()[:16]


def _pair(row: dict[str, Any], form: PairFormat) -> tuple[list[Turn], Any, Any, Any] | str:
    """(context, question, chosen, rejected) of one row, or why it is not a pair."""
    prompt = row[form.prompt] if form.prompt else None
    chosen, rejected = row[form.chosen], row[form.rejected]
    if all(isinstance(v, str | None) for v in (prompt, chosen, rejected)):
        if form.prompt:  # one user turn; answers as they are (None or "" is tokenize's to drop)
            return _system_turns(row, form), prompt, chosen, rejected
        if not (_is_transcript(chosen) and _is_transcript(rejected)):
            return _shared_start(chosen, rejected, row, form)
        chosen, rejected = _transcript(chosen), _transcript(rejected)
        for side in (chosen, rejected):
            if isinstance(side, str):
                return side
    return _conversation_pair(prompt, chosen, rejected, row, form)


def _system_turns(row: dict[str, Any], form: PairFormat) -> list[Turn]:
    system = row.get(form.system) if form.system else None
    return [{"role": "system", "content": system}] if system else []


def _shared_start(
    chosen: Any, rejected: Any, row: dict[str, Any], form: PairFormat
) -> tuple[list[Turn], Any, Any, Any] | str:
    """Texts with an implicit prompt: the prompt is the start they share, up to a space."""
    if not chosen or not rejected:
        return "a missing or empty side in an implicit-prompt pair"
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1))
    if cut <= 0 or not chosen[:cut].strip():
        return "chosen and rejected share no prompt (no explicit prompt column, no common start)"
    answers = chosen[cut:].strip(), rejected[cut:].strip()
    return _system_turns(row, form), chosen[:cut].strip(), *answers


def _is_transcript(text: Any) -> bool:
    return isinstance(text, str) and "\n\nHuman:" in text and "\n\nAssistant:" in text


def _transcript(text: str) -> list[Turn] | str:
    """An HH-rlhf transcript as messages (Human -> user, Assistant -> assistant)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        return "text before the transcript's first Human: turn"
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _messages(value: Any, column: str) -> list[Turn] | str:
    """A {role, content} message list (text: one assistant turn), or why `value` is not one."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        return f"{column} is neither text nor a non-empty list of messages"
    turns = []
    for message in value:
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            return f"{column} holds a message that is not {{role, content}}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            return f"{column} holds a message with role {role!r} or non-text content"
        turns.append({"role": role, "content": content})
    return turns


def _conversation_pair(
    prompt: Any, chosen: Any, rejected: Any, row: dict[str, Any], form: PairFormat
) -> tuple[list[Turn], Any, Any, Any] | str:
    """Messages: the turns the two sides share, then each side's final assistant turn."""
    if chosen is None or rejected is None:
        return "a missing side"
    head: list[Turn] | str = []
    if isinstance(prompt, str):
        head = [{"role": "user", "content": prompt}]
    elif prompt is not None:
        head = _messages(prompt, form.prompt)
    good = _messages(chosen, form.chosen)
    bad = _messages(rejected, form.rejected)
    for part in (head, good, bad):
        if isinstance(part, str):
            return part
    good, bad = _joined(head, good), _joined(head, bad)  # type: ignore[arg-type]
    if good[-1]["role"] != "assistant" or bad[-1]["role"] != "assistant":
        return "a conversation that does not end with an assistant turn"
    if good[:-1] != bad[:-1]:
        return "chosen and rejected differ before their last turn"
    turns = good[:-1]
    if not turns or turns[0]["role"] != "system":
        turns = _system_turns(row, form) + turns
    if not turns or turns[-1]["role"] != "user":
        return "no user turn before the answer"
    if any(t["role"] == "system" for t in turns[1:]):
        return "a system turn after the first turn"
    return turns[:-1], turns[-1]["content"], good[-1]["content"], bad[-1]["content"]


def _joined(head: list[Turn], side: list[Turn]) -> list[Turn]:
    """head + side, where a side that starts by repeating the prompt (ultrafeedback's lists hold
    the user turn too) does not repeat it."""
    return head + (side[len(head) :] if head and side[: len(head)] == head else side)
