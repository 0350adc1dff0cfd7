"""tiktoken as the encoder of a tokenizer it reproduces id for id: Qwen's byte-level BPE.

Qwen's tokenizer began in tiktoken's format (ranks); its Hugging Face form is the same vocabulary
with merges derived from the ranks. For such a tokenizer tiktoken's encoder returns the same ids
as the Rust `tokenizers` backend, several times faster, which is most of the tokenize stage's
time. That is checked, not assumed, on the tokenizer in hand (`encoder` returns None when a
check fails, and the caller uses the tokenizer itself):

* the model is plain BPE (no dropout, byte fallback, merge skipping or word affixes), with no
  normalizer or NFC, and Qwen's pre-tokenizer (its split pattern, then bytes to characters);
* the added tokens (matched in the raw text by both) are none inside another, with no strip or
  word options;
* merge i is exactly the pair that tiktoken's rank-ordered merging makes of its token from lower
  ranks, in rank order: under that condition merge-ordered and rank-ordered BPE agree.

With NFC, a text that is not already NFC goes to the tokenizer itself: the two normalise around
added tokens differently. The ids are those of a plain call (no truncation, no padding, no
special tokens added), as `pipeline.data.prompts.encode_many` wants them.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
import weakref
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

Encoder = Callable[[str], "list[int] | None"]  # None: this text needs the tokenizer itself
# Built encoders by tokenizer object, and by the tokenizer's content: a copy of the tokenizer
# (unpickled in a map worker) finds the encoder its parent built, when the worker was forked.
_BY_OBJECT: weakref.WeakKeyDictionary[Any, Encoder | None] = weakref.WeakKeyDictionary()
_BY_CONTENT: dict[str, Encoder | None] = {}
PLAIN_BPE = {"dropout": None, "byte_fallback": False, "ignore_merges": False}


def encoder(tokenizer: PreTrainedTokenizerBase) -> Encoder | None:
    """tiktoken's encoder for `tokenizer`, or None where it would not give the same ids. Built
    and checked once per tokenizer content (the check takes a second or two for Qwen's 151k
    merges): call it before starting worker processes, and forked workers inherit it."""
    if tokenizer not in _BY_OBJECT:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else ""
        key = hashlib.sha256(spec.encode()).hexdigest()
        if key not in _BY_CONTENT:
            _BY_CONTENT[key] = _build(tokenizer, spec)
        _BY_OBJECT[tokenizer] = _BY_CONTENT[key]
    return _BY_OBJECT[tokenizer]


def qwen_pretokenizer(backend: Any) -> bool:
    """Whether `backend` splits text as Qwen's tokenizer does: its pattern, then ByteLevel."""
    if backend is None or backend.pre_tokenizer is None:
        return False
    pre = json.loads(backend.pre_tokenizer.__getstate__())
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    return (
        [step["type"] for step in steps] == ["Split", "ByteLevel"]
        and steps[0]
        == {
            "type": "Split",
            "pattern": {"Regex": PRETOKENIZE_REGEX},
            "behavior": "Isolated",
            "invert": False,
        }
        and not steps[1]["use_regex"]
    )


def normalizer_of(backend: Any) -> dict[str, Any] | None:
    return json.loads(backend.normalizer.__getstate__()) if backend.normalizer else None


def _build(tokenizer: PreTrainedTokenizerBase, spec_json: str) -> Encoder | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    normalizer = normalizer_of(backend)
    if normalizer not in (None, {"type": "NFC"}) or not qwen_pretokenizer(backend):
        return None
    spec = json.loads(spec_json)
    model = spec["model"]
    if model["type"] != "BPE" or any(model.get(k) != v for k, v in PLAIN_BPE.items()):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    added = _added_tokens(spec["added_tokens"])
    ranks = _ranks(model["vocab"], model["merges"])
    if added is None or ranks is None:
        return None
    import tiktoken

    encoding = tiktoken.Encoding(
        "checked", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens=added
    )
    if normalizer is None:
        return lambda text: encoding.encode(text, allowed_special="all")
    return lambda text: (
        encoding.encode(text, allowed_special="all")
        if unicodedata.is_normalized("NFC", text)
        else None
    )


def _added_tokens(tokens: list[dict[str, Any]]) -> dict[str, int] | None:
    """The added tokens by content, if tiktoken's special-token matching finds them where the
    tokenizer does: raw text, no strip or word options, none inside another."""
    options = ("lstrip", "rstrip", "single_word", "normalized")
    if any(token.get(option) for token in tokens for option in options):
        return None
    contents = [token["content"] for token in tokens]
    if any(a != b and a in b for a in contents for b in contents):
        return None
    return {token["content"]: token["id"] for token in tokens}


def _ranks(vocab: dict[str, int], merges: list[Any]) -> dict[bytes, int] | None:
    """The vocabulary as tiktoken's ranks (token bytes -> id), if its merges are the ones the
    ranks imply (the module's third condition)."""
    # ByteLevel's characters back to their bytes: each to the code point of its byte, then
    # latin-1 (code point = byte). Any other character (one above 255, or one below that is not
    # in ByteLevel's alphabet, sent to U+FFFF) fails to encode.
    alphabet = {char: chr(byte) for byte, char in bytes_to_unicode().items()}
    table = str.maketrans({**{chr(i): "\uffff" for i in range(256)}, **alphabet})

    def raw(token: str) -> bytes:
        return token.translate(table).encode("latin-1")

    try:
        as_bytes = {token: raw(token) for token in vocab}
    except UnicodeEncodeError:  # a token that is not bytes in ByteLevel's characters
        return None
    ranks = {as_bytes[token]: rank for token, rank in vocab.items()}
    if len(set(ranks.values())) != len(ranks) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    previous = -1
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        first, second = as_bytes.get(left), as_bytes.get(right)
        if first is None or second is None:
            return None
        rank = ranks.get(first + second, -1)
        if rank <= previous:
            return None
        pair = len(first) + len(second) == 2  # two bytes: no other way to make the token
        if not pair and _merge_by_rank(first + second, ranks, rank) != [first, second]:
            return None
        previous = rank
    return ranks


def _merge_by_rank(piece: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's merging of `piece`'s bytes, using only ranks below `below`: repeatedly join
    the adjacent pair whose join has the lowest rank (the leftmost of equals)."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    rank = ranks.get
    joins = [rank(a + b, below) for a, b in zip(parts[:-1], parts[1:], strict=True)]  # i, i+1
    while joins and (best := min(joins)) < below:
        i = joins.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del joins[i]
        if i > 0:
            joins[i - 1] = rank(parts[i - 1] + parts[i], below)
        if i < len(joins):
            joins[i] = rank(parts[i] + parts[i + 1], below)
    return parts
