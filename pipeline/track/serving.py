"""The trained policy as an MLflow pyfunc model: prompts in, generated answers out.

Logged with MLflow's "models from code": this file is stored with the model and executed when the
model is loaded (`mlflow.pyfunc.load_model("models:/<name>@champion")`), so nothing is pickled.
The Hugging Face folder (safetensors + tokenizer) travels as the artifact "policy".
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class PolicyTextGenerator(mlflow.pyfunc.PythonModel):
    """Greedy continuation of each prompt by the DPO-trained Qwen3 policy."""

    def load_context(self, context: Any) -> None:
        folder = context.artifacts["policy"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).to(device)
        self.model.eval()

    # model_input is hinted as a DataFrame, a type MLflow infers no signature from: a hint such
    # as list[str] would make MLflow 3 replace the logged signature, and with it the params
    # schema that lets callers pass max_new_tokens (they would be ignored).
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """Prompts (a one-column DataFrame, a list of strings or one string) -> one greedy answer
        each, at most params["max_new_tokens"] tokens long."""
        prompts = _prompts(model_input)
        # The signature (pipeline/track/registry.py) declares max_new_tokens with its default.
        max_new = int((params or {}).get("max_new_tokens", 64))
        answers = []
        for prompt in prompts:  # one at a time: no padding side effects on a causal LM
            ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            ids = ids.to(self.model.device)
            with torch.no_grad():
                out = self.model.generate(
                    **ids,
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            answers.append(
                self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            )
        return answers


def _prompts(model_input: Any) -> list[str]:
    # MLflow may hand over a DataFrame (one column of prompts) even for a list[str] signature.
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


mlflow.models.set_model(PolicyTextGenerator())
