"""The served policy (pipeline/track/serving.py, logged by pipeline/track/registry.log_policy):
a plain question reaches generate() as exactly the prompt ids the tokenize stage trained on,
in the format logged with the model; answers end at the first stop token."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch

from pipeline.data.prompts import encode_prompt
from pipeline.params import TokenizeParams
from pipeline.track.registry import log_policy
from pipeline.track.serving import END_OF_TURN, PolicyTextGenerator, stop_ids

QUESTIONS = (
    "How do I reverse a list in Python?",
    "Why does {question} stay as it is?\nTwo lines, tabs\tand ünïcode 🙂.",
    "",
)

# ChatML as Qwen3 writes it: with enable_thinking false the assistant turn opens with an empty
# think block, so a server that forgot the flag would prompt differently from training.
THINKING_CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)


def tokenize_params(use_chat_template: bool) -> TokenizeParams:
    """A format other than params.yaml's (its template differs), with no prompt cut short."""
    return TokenizeParams(
        template="### Q:\n{question}\n### A:",
        use_chat_template=use_chat_template,
        max_length=100_000,
        max_prompt_length=99_999,
        max_drop_share=0.0,
        num_proc=1,
        pairs_per_shard=1,
    )


def served(folder: Path, tokenize: TokenizeParams, root: Path) -> mlflow.pyfunc.PyFuncModel:
    """The policy at `folder` logged by log_policy to a fresh store under `root`, loaded back
    from the registry as a caller would load the champion."""
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{root / 'mlflow.db'}")
    with mlflow.start_run() as run:
        pass
    version = mlflow.register_model(log_policy(run.info.run_id, folder, tokenize), "policy")
    return mlflow.pyfunc.load_model(f"models:/policy/{version.version}")


class Recorder:
    """Stands in for the model's generate(): records the prompt ids, answers `tail`."""

    def __init__(self, tail: list[int]) -> None:
        self.tail, self.prompts, self.kwargs = tail, [], []

    def __call__(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.prompts.append(input_ids[0].tolist())
        self.kwargs.append(kwargs)
        return torch.cat([input_ids, torch.tensor([self.tail])], dim=1)


def with_thinking_template(demo_model_dir: Path, folder: Path):
    """A copy of the demo model whose tokenizer has Qwen3's enable_thinking branch."""
    from transformers import AutoTokenizer

    shutil.copytree(demo_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = THINKING_CHATML
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("prompting", ["template", "chat-template", "thinking-chat-template"])
def test_a_plain_question_is_prompted_as_the_tokenize_stage_prompted_it(
    prompting, demo_model_dir, demo_tokenizer, tmp_path, monkeypatch
) -> None:
    folder, tokenizer = demo_model_dir, demo_tokenizer
    if prompting == "thinking-chat-template":
        folder = tmp_path / "policy"
        tokenizer = with_thinking_template(demo_model_dir, folder)
    tokenize = tokenize_params(prompting != "template")
    model = served(folder, tokenize, tmp_path)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the format is the logged one
    generator = model.unwrap_python_model()
    generator.model.generate = Recorder([tokenizer.eos_token_id])
    assert model.predict(list(QUESTIONS)) == ["", "", ""]
    expected = [encode_prompt(tokenizer, q, tokenize) for q in QUESTIONS]
    assert all(not cut for _, cut in expected)
    assert generator.model.generate.prompts == [ids for ids, _ in expected]
    prompt = tokenizer.decode(generator.model.generate.prompts[0])
    # The formats really differ: the logged template, or the chat template's user turn (with the
    # empty think block where the template has the flag).
    assert prompt.startswith("### Q:") == (prompting == "template")
    assert ("<|im_start|>user" in prompt) == (prompting != "template")
    assert prompt.endswith("</think>\n\n") == (prompting == "thinking-chat-template")


@pytest.mark.slow
def test_raw_prompts_go_to_the_model_as_sent(demo_model_dir, demo_tokenizer, tmp_path) -> None:
    tokenize = tokenize_params(True)
    model = served(demo_model_dir, tokenize, tmp_path)
    declared = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert declared == {"max_new_tokens": 64, "raw": False}
    generator = model.unwrap_python_model()
    generator.model.generate = Recorder([demo_tokenizer.eos_token_id])
    formatted = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    model.predict([formatted], params={"raw": True})
    model.predict(["Hi"])
    raw, plain = generator.model.generate.prompts
    assert raw == demo_tokenizer(formatted, add_special_tokens=False)["input_ids"] == plain


@pytest.mark.slow
def test_answers_end_at_the_first_stop_token_without_special_tokens(
    demo_model_dir, demo_tokenizer, tmp_path
) -> None:
    model = served(demo_model_dir, tokenize_params(True), tmp_path)
    generator = model.unwrap_python_model()
    words = demo_tokenizer(" reversed list", add_special_tokens=False)["input_ids"]
    end = demo_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    real_generate = generator.model.generate
    generator.model.generate = Recorder(words + [end] + words)
    assert model.predict(["Q"]) == [demo_tokenizer.decode(words)]
    assert end in generator.model.generate.kwargs[0]["eos_token_id"]
    # The real model: at most max_new_tokens tokens, no special token text in the answer.
    generator.model.generate = real_generate
    (answer,) = model.predict(["How do I reverse a list in Python?"], {"max_new_tokens": 6})
    assert len(demo_tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 6
    assert not any(token in answer for token in demo_tokenizer.all_special_tokens)


def test_stop_tokens_include_the_end_of_turn_when_eos_is_another_token(demo_tokenizer) -> None:
    """A base model's tokenizer ends text with <|endoftext|>; its chat turns with <|im_end|>."""
    base = copy.deepcopy(demo_tokenizer)
    base.eos_token = "<|endoftext|>"
    ids = {t: base.convert_tokens_to_ids(t) for t in ("<|endoftext|>", END_OF_TURN)}
    assert stop_ids(base, None) == sorted(ids.values())
    assert stop_ids(base, [ids[END_OF_TURN]]) == sorted(ids.values())


def test_a_model_logged_without_its_prompt_format_fails_clearly(demo_model_dir) -> None:
    context = SimpleNamespace(artifacts={"policy": str(demo_model_dir)})
    with pytest.raises(ValueError, match="prompt_format"):
        PolicyTextGenerator().load_context(context)
