"""The prompt contract: how a question becomes prompt token ids and an answer completion ids.

The tokenize stage builds the DPO pairs with it; the reward model and the judge build their
inputs with it too, so a question reads the same to every model the pipeline trains or asks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from pipeline.data import bpe
from pipeline.params import TokenizeParams
from pipeline.stage_io import StageError

# The turns before a prompt's last user turn: an optional system turn, then earlier exchanges.
Context = Sequence[dict[str, str]]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, params: TokenizeParams, context: Context = ()
) -> str:
    """The prompt text: the template, or the tokenizer's chat template with the context's turns
    and one user turn. A context needs the chat template: the template has one question."""
    if not params.use_chat_template:
        if context:
            raise StageError(
                "tokenize.use_chat_template: the data holds conversations (a system turn or "
                "earlier turns); set it to true to render them with the tokenizer's chat template"
            )
        return params.template.replace("{question}", question)
    # enable_thinking=False: Qwen3's template then opens an empty think block, which is what a
    # non-reasoning answer follows; templates without the flag ignore it.
    return tokenizer.apply_chat_template(
        [*context, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_many(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode` of each text: by tiktoken where it gives the tokenizer's own ids (Qwen's
    tokenizer, `pipeline.data.bpe`), else by the tokenizer in one call."""
    fast = bpe.encoder(tokenizer)
    encoded = [fast(text) for text in texts] if fast else [None] * len(texts)
    rest = [i for i, ids in enumerate(encoded) if ids is None]
    for i, ids in zip(rest, _encode_list(tokenizer, [texts[i] for i in rest]), strict=True):
        encoded[i] = ids
    return encoded  # type: ignore[return-value]  # every None was filled


def _encode_list(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """The tokenizer's ids for each text in one call. A fast tokenizer's Rust backend encodes the
    list without the character offsets it would otherwise compute for every token (same ids,
    about a third less time); other tokenizers go through their usual call."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or backend.truncation or backend.padding:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in fast(texts, add_special_tokens=False)]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    params: TokenizeParams,
    contexts: Sequence[Context] | None = None,
) -> list[tuple[list[int], bool]]:
    """Per prompt: ids within max_prompt_length, and whether it was cut.

    A conversation too long keeps its latest turns: its earliest exchanges go first (a system
    turn stays). Then only the question is cut (its start kept): the template's tail ("Answer: "
    or the assistant header) is what tells the model an answer follows, so it always survives.
    """
    contexts = [list(c) for c in contexts] if contexts is not None else [[] for _ in questions]
    rendered = encode_many(
        tokenizer,
        [render_prompt(tokenizer, q, params, c) for q, c in zip(questions, contexts, strict=True)],
    )
    prompts = [(ids, False) for ids in rendered]
    over = [i for i, ids in enumerate(rendered) if len(ids) > params.max_prompt_length]
    for i in over:
        if contexts[i]:
            contexts[i], ids = _latest_turns(tokenizer, questions[i], contexts[i], params)
            prompts[i] = (ids, True)
    over = [i for i in over if len(prompts[i][0]) > params.max_prompt_length]
    cut = _shortened(
        tokenizer,
        [questions[i] for i in over],
        [prompts[i][0] for i in over],
        params,
        [contexts[i] for i in over],
    )
    for i, ids in zip(over, cut, strict=True):
        prompts[i] = (ids, True)
    return prompts


def _latest_turns(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    context: list[dict[str, str]],
    params: TokenizeParams,
) -> tuple[list[dict[str, str]], list[int]]:
    """The context less its earliest exchanges (a system turn stays) until the prompt fits or no
    earlier turn is left -> (context, the prompt's ids)."""
    system = context[:1] if context and context[0]["role"] == "system" else []
    turns = context[len(system) :]
    ids = encode(tokenizer, render_prompt(tokenizer, question, params, context))
    while turns and len(ids) > params.max_prompt_length:
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # an exchange starts with a user turn
            turns = turns[1:]
        ids = encode(tokenizer, render_prompt(tokenizer, question, params, system + turns))
    return system + turns, ids


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, params: TokenizeParams, context: Context = ()
) -> tuple[list[int], bool]:
    """`encode_prompts` of one prompt."""
    return encode_prompts(tokenizer, [question], params, [context])[0]


def _shortened(
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    rendered: list[list[int]],
    params: TokenizeParams,
    contexts: list[list[dict[str, str]]],
) -> list[list[int]]:
    """Prompts of questions too long for max_prompt_length (`rendered`: their full prompts'
    ids, `contexts`: the turns before each): each question's first tokens, as many as fit.

    A question keeps its length less the prompt's excess, cut in the text where its last kept
    token ends (the tokenizer's offsets): one encoding of the questions, one of the cut prompts.
    Where tokens merge differently at the cut and the prompt still exceeds, the question keeps
    fewer and is cut again (a rare second round)."""
    budget = params.max_prompt_length
    ends = _token_ends(tokenizer, questions)
    keep = [max(len(e) - (len(r) - budget), 0) for e, r in zip(ends, rendered, strict=True)]
    prompts: list[list[int]] = [[] for _ in questions]
    pending = list(range(len(questions)))
    while pending:
        shorts = [questions[i][: ends[i][keep[i] - 1]] if keep[i] else "" for i in pending]
        texts = [
            render_prompt(tokenizer, shorts[n], params, contexts[i]) for n, i in enumerate(pending)
        ]
        encoded = encode_many(tokenizer, texts)
        still = []
        for i, ids in zip(pending, encoded, strict=True):
            if len(ids) <= budget or keep[i] == 0:
                # keep == 0 and still too long: the template alone exceeds the budget; cut it.
                prompts[i] = ids[:budget]
            else:
                keep[i] = max(keep[i] - (len(ids) - budget), 0)
                still.append(i)
        pending = still
    return prompts


def _token_ends(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Per text, the character position where each of its tokens ends."""
    if not texts:
        return []
    offsets = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [[end for _, end in spans] for spans in offsets["offset_mapping"]]


def encode_completions(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Completion ids of each text, ending with exactly one EOS whatever the text ended with."""
    return [_with_one_eos(ids, tokenizer.eos_token_id) for ids in encode_many(tokenizer, texts)]


def completion_heads(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], lengths: list[int]
) -> list[list[int]]:
    """Per text, the first `lengths[i]` ids of `encode_completions`, encoding only the start of a
    text much longer than that: a training pair keeps at most max_length tokens, and a 20,000-word
    answer would otherwise cost its whole encoding to keep its first few hundred tokens.

    A text is cut before a space that follows a non-space. With Qwen's (or GPT-2's) byte-level
    pre-tokenizer no pre-token spans such a point, so the start's ids are the whole text's first
    ids; with any other tokenizer every text is encoded whole."""
    if not _cuts_at_spaces(tokenizer):
        whole = encode_completions(tokenizer, texts)
        return [ids[:n] for ids, n in zip(whole, lengths, strict=True)]
    heads: list[list[int]] = [[] for _ in texts]
    chars = [max(n, 1) * CHARS_PER_TOKEN_GUESS for n in lengths]
    pending = list(range(len(texts)))
    while pending:
        cuts = [_space_cut(texts[i], chars[i]) for i in pending]
        starts = [texts[i][:cut] for i, cut in zip(pending, cuts, strict=True)]
        encoded = encode_many(tokenizer, starts)
        still = []
        for i, cut, ids in zip(pending, cuts, encoded, strict=True):
            if cut == len(texts[i]):  # the whole text
                heads[i] = _with_one_eos(ids, tokenizer.eos_token_id)[: lengths[i]]
            elif len(ids) >= lengths[i]:  # the text goes on past the cut: no EOS in its head
                heads[i] = ids[: lengths[i]]
            else:  # dense text (code, CJK): fewer characters per token than guessed
                chars[i] = 2 * cut
                still.append(i)
        pending = still
    return heads


# Characters of text encoded first per token wanted: English runs at ~4 per Qwen token, so one
# round covers nearly every text; denser text takes another round with twice as many.
CHARS_PER_TOKEN_GUESS = 6
_SPACE_AFTER_NON_SPACE = re.compile(r"(?<=\S) ")


def _space_cut(text: str, start: int) -> int:
    """The first position >= start holding a space after a non-space; len(text) if none."""
    found = _SPACE_AFTER_NON_SPACE.search(text, start) if start < len(text) else None
    return found.start() if found else len(text)


def _cuts_at_spaces(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether cutting a text before a space after a non-space keeps the start's ids: true of
    byte-level BPE split by Qwen's or GPT-2's pattern (every pre-token holds spaces only at its
    start or is all whitespace), under no normalizer or NFC, with no added token holding a space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return False
    if bpe.normalizer_of(backend) not in (None, {"type": "NFC"}):
        return False
    if any(" " in token.content for token in tokenizer.added_tokens_decoder.values()):
        return False
    pre = json.loads(backend.pre_tokenizer.__getstate__())
    if pre["type"] == "ByteLevel":
        return bool(pre["use_regex"])  # GPT-2's own pattern
    return bpe.qwen_pretokenizer(backend)


def _with_one_eos(ids: list[int], eos: int) -> list[int]:
    while ids and ids[-1] == eos:
        ids.pop()
    return ids + [eos]


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """`encode_completions` of one text."""
    return encode_completions(tokenizer, [text])[0]
