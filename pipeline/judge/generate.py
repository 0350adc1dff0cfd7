"""Answers to held-out questions, written by a causal LM and scored by the reward model.

The base model and the policy answer the same questions with the same decoding settings and the
same seeds (batch b samples under seed judge.seed + b), so two identical models write identical
answers and an untrained policy ties the base: the win rate measures what training changed,
not sampling noise.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel

from pipeline.data.prompts import encode, encode_prompt
from pipeline.data.schema import TURN
from pipeline.judge.reward import open_reward_model, score_rows
from pipeline.judge.statistics import repetition_loop
from pipeline.model.loading import Runtime, freeze, load_causal_lm, pad_token_id
from pipeline.model.positions import check_positions
from pipeline.params import Params
from pipeline.stage_io import MODEL_BASE, MODEL_REWARD, bar

ANSWERS_FILE = "answers.parquet"  # in data/judge_base
# One row per answer: who wrote it (base, policy or human: the dataset's best answer), for which
# question (prompt index) and which sample, its text, length in tokens, whether it hit the
# token limit or loops, and its reward.
ANSWERS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("prompt", pa.int32()),
        ("sample", pa.int32()),
        ("url", pa.string()),
        ("question", pa.string()),
        ("context", pa.list_(TURN)),  # the turns before the question (conversations)
        ("answer", pa.string()),
        ("tokens", pa.int32()),
        ("hit_max", pa.bool_()),
        ("loop", pa.bool_()),
        ("reward", pa.float64()),
    ]
)


@dataclasses.dataclass(frozen=True)
class Question:
    url: str
    text: str
    best: str  # the dataset's best answer: the one that wins most of the question's pairs
    context: tuple[dict[str, str], ...] = ()  # the turns before the question


# The longest sequence generation reads, as the params that bound it.
PROMPT_AND_ANSWER = "tokenize.max_prompt_length + judge.max_new_tokens"


def judge_questions(held_out: pa.Table, count: int, seed: int) -> list[Question]:
    """`count` distinct held-out questions (all when there are fewer), a seeded choice kept in
    the order the split lists them, each with the dataset's best answer."""
    keyed = held_out.select(["question_id", "question", "context", "chosen", "rejected"])
    texts: dict[str, tuple[str, tuple[dict[str, str], ...]]] = {}
    won: dict[str, Counter[str]] = {}
    for url, question, context, chosen, rejected in zip(*keyed.to_pydict().values(), strict=True):
        texts.setdefault(url, (question or "", tuple(context or ())))
        score = won.setdefault(url, Counter())
        score[chosen or ""] += 1
        score[rejected or ""] += 0  # counted, so a question's answers are all candidates
    urls = list(texts)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(urls), size=min(count, len(urls)), replace=False))
    return [
        Question(urls[i], texts[urls[i]][0], won[urls[i]].most_common(1)[0][0], texts[urls[i]][1])
        for i in picked
    ]


@dataclasses.dataclass(frozen=True)
class Answer:
    tokens: list[int]  # without the end marker
    hit_max: bool  # no end marker within max_new_tokens: cut, not finished


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (generation continues each row at its end)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _decoding(model: PreTrainedModel, params: Params, pad_id: int) -> GenerationConfig:
    """The judge's decoding and nothing else: settings left unset would be filled in from the
    model folder's generation_config.json or transformers' defaults (a top-k of 50, Qwen3's
    top-k 20), so top-k and the repetition penalty are switched off explicitly."""
    judge, sample = params.judge, params.judge.temperature > 0
    return GenerationConfig(
        do_sample=sample,
        temperature=judge.temperature if sample else None,
        top_p=judge.top_p if sample else None,
        top_k=0,
        repetition_penalty=1.0,
        max_new_tokens=judge.max_new_tokens,
        num_return_sequences=judge.samples,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=pad_id,
    )


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    params: Params,
    pad_id: int,
    runtime: Runtime,
    desc: str,
) -> list[list[Answer]]:
    """judge.samples answers per prompt (token ids), batched with the KV cache."""
    config = _decoding(model, params, pad_id)
    ends = config.eos_token_id
    ends = {ends} if isinstance(ends, int) else set(ends or [])
    size, answers = params.judge.generate_batch_size, []
    for batch, start in enumerate(bar(range(0, len(prompts), size), desc=desc, unit="batch")):
        ids, mask = _left_padded(prompts[start : start + size], pad_id)
        torch.manual_seed(params.judge.seed + batch)  # the same draws for every model
        with runtime.autocast():
            out = model.generate(
                input_ids=ids.to(runtime.device),
                attention_mask=mask.to(runtime.device),
                generation_config=config,
            )
        for row in out[:, ids.shape[1] :].tolist():
            cut = next((i for i, token in enumerate(row) if token in ends), None)
            answers.append(Answer(row[:cut], cut is None))
    per = params.judge.samples
    return [answers[i : i + per] for i in range(0, len(answers), per)]


def model_answers(
    model_dir: Path, source: str, questions: list[Question], params: Params, runtime: Runtime
) -> pa.Table:
    """ANSWERS_SCHEMA rows of the model at `model_dir` (its answers, their lengths and loops),
    reward not yet filled in (NaN)."""
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    longest = params.tokenize.max_prompt_length + params.judge.max_new_tokens
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    check_positions(config, {PROMPT_AND_ANSWER: longest}, trust)  # before the weights load
    model = freeze(load_causal_lm(model_dir, runtime, trust))
    prompts = [encode_prompt(tokenizer, q.text, params.tokenize, q.context)[0] for q in questions]
    written = generate(model, prompts, params, pad_token_id(tokenizer), runtime, source)
    rows = [
        {
            "source": source,
            "prompt": p,
            "sample": s,
            "url": q.url,
            "question": q.text,
            "context": list(q.context),
            "answer": tokenizer.decode(a.tokens, skip_special_tokens=True),
            "tokens": len(a.tokens),
            "hit_max": a.hit_max,
            "loop": repetition_loop(a.tokens),
            "reward": float("nan"),
        }
        for p, (q, answers) in enumerate(zip(questions, written, strict=True))
        for s, a in enumerate(answers)
    ]
    return pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA)


def human_answers(model_dir: Path, questions: list[Question], params: Params) -> pa.Table:
    """ANSWERS_SCHEMA rows of the dataset's best answers (sample 0; lengths in the policy's
    tokens, as the models' answers are counted)."""
    tokenizer = AutoTokenizer.from_pretrained(
        model_dir, trust_remote_code=params.model.trust_remote_code
    )
    rows = [
        {
            "source": "human",
            "prompt": p,
            "sample": 0,
            "url": q.url,
            "question": q.text,
            "context": list(q.context),
            "answer": q.best,
            "tokens": len(encode(tokenizer, q.best)),
            "hit_max": False,
            "loop": False,
            "reward": float("nan"),
        }
        for p, q in enumerate(questions)
    ]
    return pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA)


def scored(table: pa.Table, params: Params, runtime: Runtime) -> pa.Table:
    """`table` with its reward column filled in by the reward stage's model (which reads the
    texts with its own tokenizer)."""
    model, tokenizer, form = open_reward_model(
        MODEL_REWARD, runtime, params.model.trust_remote_code
    )
    texts = zip(*(table[c].to_pylist() for c in ("question", "answer", "context")), strict=True)
    rows = [form.row(tokenizer, q, a, c) for q, a, c in texts]
    rewards = score_rows(model, rows, params.judge.batch_size, runtime, desc="reward")
    index = table.schema.get_field_index("reward")
    return table.set_column(index, "reward", pa.array(rewards, pa.float64()))


def base_side(questions: list[Question], params: Params, runtime: Runtime) -> pa.Table:
    """What the policy's answers are judged against: the base model's answers to `questions`
    and the dataset's best answers, scored."""
    answers = model_answers(MODEL_BASE, "base", questions, params, runtime)
    humans = human_answers(MODEL_BASE, questions, params)
    return scored(pa.concat_tables([answers, humans]), params, runtime)
