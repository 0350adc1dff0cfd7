"""The trained policy as an MLflow pyfunc model: questions in, generated answers out.

Logged with MLflow's "models from code": this file is stored with the model and executed when the
model is loaded (`mlflow.pyfunc.load_model("models:/<name>@champion")`), so nothing is pickled.
The Hugging Face folder (safetensors + tokenizer) travels as the artifact "policy", and the prompt
format the policy was trained with (tokenize.template / tokenize.use_chat_template, written by
pipeline/track/registry.py when the model is logged) as the artifact "prompt_format".

The file imports nothing from the project: a version loaded from the registry long after it was
logged runs with its own copy of this code and its own prompt format, whatever the repository's
params.yaml or `pipeline` package says by then.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

# Chat templates of the ChatML family (Qwen's among them) close a turn with this token; a policy
# trained on them may end its answer with it rather than with the tokenizer's EOS.
END_OF_TURN = "<|im_end|>"


def render_question(tokenizer: PreTrainedTokenizerBase, question: str, fmt: dict[str, Any]) -> str:
    """The prompt text the tokenize stage built for `question` under `fmt` (the logged
    prompt format): the template with {question} replaced, or the tokenizer's chat template with
    one user turn and the generation prompt. It must render exactly as
    pipeline.data.prompts.render_prompt does (tests/test_serving.py checks the ids agree)."""
    if not fmt["use_chat_template"]:
        return fmt["template"].replace("{question}", question)
    # enable_thinking=False as in training: Qwen3's template then opens an empty think block.
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )


def stop_ids(tokenizer: PreTrainedTokenizerBase, model_eos: int | list[int] | None) -> list[int]:
    """Tokens that end an answer: the model's configured EOS, the tokenizer's EOS (training
    appended it to every answer) and, where the vocabulary has it, the chat end-of-turn token."""
    ends = [model_eos] if isinstance(model_eos, int) else list(model_eos or [])
    ends.append(tokenizer.eos_token_id)
    turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if turn is not None and turn != tokenizer.unk_token_id:
        ends.append(turn)
    return sorted({int(i) for i in ends if i is not None})


class PolicyTextGenerator(mlflow.pyfunc.PythonModel):
    """Greedy answer of the DPO-trained Qwen3 policy to each question, asked in the prompt
    format the policy was trained with."""

    def load_context(self, context: Any) -> None:
        if "prompt_format" not in context.artifacts:
            raise ValueError(
                "this model was logged without its 'prompt_format' artifact; log it with "
                "pipeline.track.registry.log_policy, which records the training prompt format"
            )
        with open(context.artifacts["prompt_format"], encoding="utf-8") as f:
            self.prompt_format = json.load(f)
        folder = context.artifacts["policy"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).to(device)
        self.model.eval()
        self.stop = stop_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        # One prompt per call pads nothing; the id only keeps generate() from warning.
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop[0] if self.stop else 0)

    def prompt_ids(self, text: str, raw: bool = False) -> list[int]:
        """Token ids of the prompt for `text`: the question in the training format, or `text`
        as it is when `raw` (a caller's already-formatted prompt). No special tokens are added,
        as the tokenize stage adds none."""
        prompt = text if raw else render_question(self.tokenizer, text, self.prompt_format)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # model_input is hinted as a DataFrame, a type MLflow infers no signature from: a hint such
    # as list[str] would make MLflow 3 replace the logged signature, and with it the params
    # schema that lets callers pass max_new_tokens and raw (they would be ignored).
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """Questions (a one-column DataFrame, a list of strings or one string) -> one greedy
        answer each, at most params["max_new_tokens"] tokens long. params["raw"]: the inputs are
        already-formatted prompts, sent to the model as they are."""
        # The signature (pipeline/track/registry.py) declares both params with their defaults.
        params = params or {}
        max_new, raw = int(params.get("max_new_tokens", 64)), bool(params.get("raw", False))
        return [self._answer(self.prompt_ids(text, raw), max_new) for text in _texts(model_input)]

    def _answer(self, prompt: list[int], max_new_tokens: int) -> str:
        """Greedy answer to one prompt (one at a time: no padding side effects on a causal LM),
        up to its first stop token, decoded without special tokens."""
        ids = torch.tensor([prompt], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop or None,
                pad_token_id=self.pad_id,
            )
        answer = out[0, len(prompt) :].tolist()
        cut = next((i for i, token in enumerate(answer) if token in self.stop), len(answer))
        return self.tokenizer.decode(answer[:cut], skip_special_tokens=True)


def _texts(model_input: Any) -> list[str]:
    # MLflow may hand over a DataFrame (one column of questions) even for a list[str] signature.
    if isinstance(model_input, pd.DataFrame):
        named = [c for c in ("question", "prompt") if c in model_input.columns]
        column = named[0] if named else model_input.columns[0]
        return [str(v) for v in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


mlflow.models.set_model(PolicyTextGenerator())
