"""The reward model: a causal LM's backbone with a scalar head, trained on preference pairs with
the Bradley-Terry loss, and the scores it gives (question, answer) texts.

The judge reads answers as text and re-encodes them with the reward model's own tokenizer, so a
reward model from another family than the policy (`judge.model`) scores the same strings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)
from transformers.utils import logging as hf_logging

from pipeline.data.prompts import Context, encode, encode_completion, encode_prompt
from pipeline.model.loading import Runtime, freeze, pad_token_id
from pipeline.params import JudgeParams, TokenizeParams
from pipeline.stage_io import StageError, bar
from pipeline.train.schedule import linear_schedule
from pipeline.train.steps import FiniteFlags, Window

FORMAT_FILE = "reward_format.json"  # in models/reward: how the judge builds the model's input


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r(chosen) - r(rejected)).

    chosen, rejected: (B,) scalar rewards of each pair's two answers. Returns a 0-dim tensor;
    log-sigmoid keeps it finite for any margin (a naive log(sigmoid(.)) underflows).
    """
    return -F.logsigmoid(chosen - rejected).mean()


def load_reward_model(
    path: Path, runtime: Runtime, trust_remote_code: bool, pad_id: int
) -> PreTrainedModel:
    """A sequence-classification model with one output at `path` (fp32, safetensors). From a
    causal LM folder the scalar head is new (initialised from the torch seed in force; the
    missing-weights report transformers prints for it is expected, so it is kept quiet). The
    score is read at the last non-pad token, so the config must know the pad id."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = sequence_classifier(config).from_pretrained(
            path,
            num_labels=1,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_id
    return model.to(runtime.device)


def sequence_classifier(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class that loads `config`'s family with a scalar head: transformers' own where it has
    one (or the model's remote code names one); for a family it gives none (Cohere, Granite),
    transformers' generic head on the family's backbone, the same architecture its Llama and
    Qwen3 classes are (a linear score read at the last non-pad token)."""
    remote = getattr(config, "auto_map", None) or {}
    if type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING or (
        "AutoModelForSequenceClassification" in remote
    ):
        return AutoModelForSequenceClassification
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise StageError(f"{type(config).__name__}: not a causal LM transformers knows")
    return _generic_classifier(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])


@functools.cache
def _generic_classifier(causal: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """<Family>ForSequenceClassification built from the family's pretrained-model base, so
    weights, config and saving follow the family's own rules (one class per family)."""
    family = next(
        c for c in causal.__mro__[1:] if issubclass(c, PreTrainedModel) and c is not PreTrainedModel
    )
    name = causal.__name__.removesuffix("ForCausalLM") + "ForSequenceClassification"
    return type(name, (GenericForSequenceClassification, family), {"__module__": __name__})


@dataclasses.dataclass(frozen=True)
class RewardFormat:
    """How a (question, answer) becomes the reward model's input: the pipeline's own prompt
    (tokenize.template or the chat template, as the policy saw it) for a reward model trained
    here; the model's chat template (a user and an assistant turn) for one from `judge.model`,
    as such models are trained."""

    tokenize: TokenizeParams
    max_length: int
    chat: bool  # the reward model's chat template

    def row(
        self,
        tokenizer: PreTrainedTokenizerBase,
        question: str,
        answer: str,
        context: Context = (),
    ) -> list[int]:
        """Token ids of one scored text: prompt, then the answer with one EOS, cut at
        max_length (the answer's end goes first; the prompt keeps its own budget)."""
        if self.chat:  # the question keeps at most its budget, so the answer is never cut away
            question_ids = encode(tokenizer, question)
            if len(question_ids) > self.tokenize.max_prompt_length:
                question = tokenizer.decode(question_ids[: self.tokenize.max_prompt_length])
            turns = [
                *context,
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            text = tokenizer.apply_chat_template(turns, tokenize=False)
            return encode(tokenizer, text)[: self.max_length]
        prompt, _ = encode_prompt(tokenizer, question, self.tokenize, context)
        return (prompt + encode_completion(tokenizer, answer))[: self.max_length]


def pair_rows(
    table: pa.Table, tokenizer: PreTrainedTokenizerBase, form: RewardFormat
) -> list[tuple[list[int], list[int]]]:
    """(chosen row, rejected row) per pair of a PAIRS_SCHEMA table; pairs whose two rows are
    identical after truncation carry no preference and are dropped."""
    pairs = []
    columns = (table[c].to_pylist() for c in ("question", "chosen", "rejected", "context"))
    for question, chosen, rejected, context in zip(*columns, strict=True):
        rows = (
            form.row(tokenizer, question or "", chosen or "", context or ()),
            form.row(tokenizer, question or "", rejected or "", context or ()),
        )
        if rows[0] != rows[1]:
            pairs.append(rows)
    return pairs


def _padded(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """(N, T) right-padded ids."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids.to(device)


def rewards(model: PreTrainedModel, ids: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """(N,) fp32 rewards of right-padded rows (N, T)."""
    mask = (ids != model.config.pad_token_id).long()
    with runtime.autocast():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


@torch.no_grad()
def score_rows(
    model: PreTrainedModel,
    rows: Sequence[list[int]],
    batch_size: int,
    runtime: Runtime,
    desc: str = "score",
) -> np.ndarray:
    """(N,) rewards of token rows, in their order (batched by length: less padding)."""
    model.eval()
    order = np.argsort([len(r) for r in rows], kind="stable")
    scores = np.empty(len(rows), dtype=np.float64)
    for start in bar(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        chunk = order[start : start + batch_size]
        ids = _padded([rows[i] for i in chunk], model.config.pad_token_id, runtime.device)
        scores[chunk] = rewards(model, ids, runtime).cpu().numpy()
    return scores


def pair_accuracy(
    model: PreTrainedModel,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    runtime: Runtime,
) -> float:
    """Share of pairs whose chosen row scores above the rejected one (a tie counts one half)."""
    rows = [row for pair in pairs for row in pair]
    scores = score_rows(model, rows, batch_size, runtime, desc="reward accuracy")
    margin = scores[0::2] - scores[1::2]
    return float(np.mean((margin > 0) + 0.5 * (margin == 0)))


def train_reward_model(
    model: PreTrainedModel,
    pairs: Sequence[tuple[list[int], list[int]]],
    params: JudgeParams,
    runtime: Runtime,
) -> list[dict[str, float]]:
    """Bradley-Terry training: AdamW, linear warmup (judge.warmup_ratio of the steps) then decay,
    gradients clipped at judge.max_grad_norm, a seeded shuffle per epoch. Steps as the DPO
    recipe's (`pipeline.train.steps`): figures summed on the device and read once per epoch, and
    a NaN/inf loss or gradient norm stops the stage. Returns one row per epoch (mean loss and
    accuracy on the train pairs)."""
    steps_per_epoch = math.ceil(len(pairs) / params.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=0.0)
    total = steps_per_epoch * params.epochs
    schedule = linear_schedule(optimizer, math.ceil(params.warmup_ratio * total), total)
    rng, history = np.random.default_rng(params.seed), []
    finite = FiniteFlags("reward model")
    model.train()
    for epoch in range(params.epochs):
        order, window = rng.permutation(len(pairs)), Window()
        for step in bar(range(steps_per_epoch), desc=f"reward epoch {epoch + 1}", unit="step"):
            started = time.perf_counter()
            batch = [pairs[i] for i in order[step * params.batch_size :][: params.batch_size]]
            rows = [r for pair in batch for r in pair]
            scores = rewards(
                model, _padded(rows, model.config.pad_token_id, runtime.device), runtime
            )
            loss = bradley_terry_loss(scores[0::2], scores[1::2])
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
            finite.add(epoch * steps_per_epoch + step + 1, torch.isfinite(loss), grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            margin = (scores[0::2] - scores[1::2]).detach()
            correct = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
            figures = torch.stack([loss.detach(), correct]).double()
            window.add(figures, grad_norm.detach().double(), len(batch), started)
        finite.check()
        (loss_sum, correct_sum), _, _ = window.close()
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / steps_per_epoch,
                "accuracy": correct_sum / steps_per_epoch,
            }
        )
    model.eval()
    return history


def load_format(folder: Path) -> RewardFormat:
    """The input format the reward stage saved beside the model."""
    saved = json.loads((folder / FORMAT_FILE).read_text(encoding="utf-8"))
    return RewardFormat(TokenizeParams(**saved["tokenize"]), saved["max_length"], saved["chat"])


def open_reward_model(
    folder: Path, runtime: Runtime, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, RewardFormat]:
    """The reward stage's model (frozen), its tokenizer and its input format."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = load_reward_model(folder, runtime, trust_remote_code, pad_token_id(tokenizer))
    return freeze(model), tokenizer, load_format(folder)
