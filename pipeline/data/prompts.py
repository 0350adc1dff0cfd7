"""The prompt contract: how a question becomes prompt token ids and an answer completion ids.

The tokenize stage builds the DPO pairs with it; the reward model and the judge build their
inputs with it too, so a question reads the same to every model the pipeline trains or asks.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pipeline.params import TokenizeParams


def render_prompt(tokenizer: PreTrainedTokenizerBase, question: str, params: TokenizeParams) -> str:
    """The prompt text: the template, or the tokenizer's chat template with one user turn."""
    if not params.use_chat_template:
        return params.template.replace("{question}", question)
    # enable_thinking=False: Qwen3's template then opens an empty think block, which is what a
    # non-reasoning answer follows; templates without the flag ignore it.
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_many(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode` of each text in one tokenizer call: a fast tokenizer encodes the list in Rust
    (several times faster than a call per text, same ids)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, questions: list[str], params: TokenizeParams
) -> list[tuple[list[int], bool]]:
    """Per question: prompt ids within max_prompt_length, and whether the question was cut.

    Only the question is cut (its start kept): the template's tail ("Answer: " or the assistant
    header) is what tells the model an answer follows, so it always survives.
    """
    rendered = encode_many(tokenizer, [render_prompt(tokenizer, q, params) for q in questions])
    prompts = [(ids, False) for ids in rendered]
    over = [i for i, ids in enumerate(rendered) if len(ids) > params.max_prompt_length]
    cut = _shortened(tokenizer, [questions[i] for i in over], [rendered[i] for i in over], params)
    for i, ids in zip(over, cut, strict=True):
        prompts[i] = (ids, True)
    return prompts


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, params: TokenizeParams
) -> tuple[list[int], bool]:
    """`encode_prompts` of one question."""
    return encode_prompts(tokenizer, [question], params)[0]


def _shortened(
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    rendered: list[list[int]],
    params: TokenizeParams,
) -> list[list[int]]:
    """Prompts of questions too long for max_prompt_length (`rendered`: their full prompts'
    ids): each question's first tokens, as many as fit. A question first keeps its length less
    the excess; while the re-rendered prompt still exceeds (tokens merge differently at the
    cut), it keeps fewer. Each round decodes and encodes every pending question in one call."""
    budget = params.max_prompt_length
    question_ids = encode_many(tokenizer, questions)
    keep = [max(len(q) - (len(r) - budget), 0) for q, r in zip(question_ids, rendered, strict=True)]
    prompts: list[list[int]] = [[] for _ in questions]
    pending = list(range(len(questions)))
    while pending:
        shorts = tokenizer.batch_decode([question_ids[i][: keep[i]] for i in pending])
        encoded = encode_many(tokenizer, [render_prompt(tokenizer, q, params) for q in shorts])
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


def encode_completions(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Completion ids of each text, ending with exactly one EOS whatever the text ended with."""
    eos = tokenizer.eos_token_id
    completions = []
    for ids in encode_many(tokenizer, texts):
        while ids and ids[-1] == eos:
            ids.pop()
        completions.append(ids + [eos])
    return completions


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """`encode_completions` of one text."""
    return encode_completions(tokenizer, [text])[0]
