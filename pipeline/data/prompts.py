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
    rendered = [render_prompt(tokenizer, q, params) for q in questions]
    return [
        (ids, False) if len(ids) <= params.max_prompt_length else _shortened(tokenizer, q, params)
        for q, ids in zip(questions, encode_many(tokenizer, rendered), strict=True)
    ]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, params: TokenizeParams
) -> tuple[list[int], bool]:
    """`encode_prompts` of one question."""
    return encode_prompts(tokenizer, [question], params)[0]


def _shortened(
    tokenizer: PreTrainedTokenizerBase, question: str, params: TokenizeParams
) -> tuple[list[int], bool]:
    """The prompt of a question too long for max_prompt_length: the question's first tokens."""
    ids = encode(tokenizer, render_prompt(tokenizer, question, params))
    question_ids = encode(tokenizer, question)
    keep = max(len(question_ids) - (len(ids) - params.max_prompt_length), 0)
    while True:
        short = tokenizer.decode(question_ids[:keep])
        ids = encode(tokenizer, render_prompt(tokenizer, short, params))
        if len(ids) <= params.max_prompt_length or keep == 0:
            # keep == 0 and still too long: the template alone exceeds the budget; cut it.
            return ids[: params.max_prompt_length], True
        keep = max(keep - (len(ids) - params.max_prompt_length), 0)


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
