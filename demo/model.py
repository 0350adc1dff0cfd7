"""The offline demo's model: a tiny Qwen3, pretrained on the demo's train answers, and a tokenizer
trained on the demo pairs.

A seeded Qwen3ForCausalLM with a byte-level BPE tokenizer, saved as an ordinary HF folder that
loads through the same classes as `Qwen/Qwen3-0.6B` (Qwen2Tokenizer with Qwen's pre-tokenizer,
specials, chat template; safetensors weights), so the demo exercises the real loading code.

It is pretrained as a causal LM on the data/rl questions with every answer they have, good and
bad alike, written in the pipeline's prompt template: like a real base model it then answers a
held-out question in the data's style, at a mix of quality levels, mostly on the question's
topic, and ends with EOS. That gives the judge (base vs policy generations, scored by a reward
model) something real to compare; a randomly initialised model would only write noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from demo.dataset import (
    DEMO_SEED,
    MODEL_FOLDER,
    PROMPT_TEMPLATE,
    ensure_demo_dataset,
    pretraining_documents,
    sample_texts,
)
from demo.tokenizer import train_tokenizer
from pipeline.data.prompts import encode, encode_completion
from pipeline.stage_io import atomic_dir, bar


@dataclasses.dataclass(frozen=True)
class TinyShape:
    """The demo model's size: it pretrains in well under a minute and learns the demo's
    preferences with DPO in a minute or two, on a CPU. Each step up in size slows every later
    demo stage that runs the model."""

    vocab_size: int = 2048  # learned tokens; Qwen's three specials come after them
    hidden_size: int = 64
    num_layers: int = 2
    intermediate_size: int = 192


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """How the demo base model learns to write demo answers before any preference training.

    A fixed number of steps, not a loss target, so the build takes the same time and makes the
    same bytes on every run on the same machine. The defaults (about five passes over the data)
    are about where the model starts to use the question's topic in its answers, not only the
    answers' style, which it picks up in the first pass; the large rate suits a model this small.
    """

    steps: int = 450
    batch_size: int = 16
    lr: float = 2e-2
    warmup_steps: int = 20
    weight_decay: float = 0.01
    # Loss on every token by default: predicting the question makes the model encode its topic,
    # which a good answer needs, and it learned the question-to-answer link in fewer steps than
    # with the loss on the answer tokens alone.
    answer_only: bool = False
    # Fixed, not the machine's core count: CPU kernels split their sums by thread, so another
    # count rounds differently and writes other bytes.
    threads: int = 2


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, documents: Iterable[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per (question, answer): the prompt and the answer are encoded
    apart, EOS ending the answer, exactly as the pipeline's prompt contract encodes a pair, so the
    base model meets at generation time the same prompt/answer boundary it was trained on."""
    examples = []
    for question, answer in documents:
        prompt = encode(tokenizer, PROMPT_TEMPLATE.replace("{question}", question))
        examples.append((prompt + encode_completion(tokenizer, answer), len(prompt)))
    return examples


def length_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random
) -> Iterator[list[int]]:
    """Endless batches of indices of similar length: each epoch shuffles, sorts pools of eight
    batches by length, cuts them into batches and shuffles those, so padding stays small while
    batch contents and order still change from epoch to epoch."""
    pool = 8 * batch_size
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches


def collate(
    examples: Sequence[tuple[list[int], int]], pad_id: int, answer_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and next-token targets (-100 where no loss is taken).

    No attention mask: with right padding and causal attention no real token ever sees a pad,
    so the pads only change pad positions, which carry no loss, and attention keeps its fast
    causal path.
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width - 1), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        first = prompt_len if answer_only else 1  # the first target predicted from the prefix
        targets[row, first - 1 : len(ids) - 1] = input_ids[row, first : len(ids)]
    return input_ids, targets


def causal_lm_loss(
    model: Qwen3ForCausalLM, input_ids: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean next-token loss over the positions with a target.

    Logits are computed at those positions only: the output projection and its softmax are the
    largest cost of a model this small, so skipping prompt and pad positions buys steps.
    """
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    scored = targets != -100
    logits = model.lm_head(hidden[scored])
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def _warmup_cosine(schedule: Pretraining) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup, then cosine decay to a tenth of the peak. The decay
    settles the weights, so generations do not carry the last few noisy updates."""

    def factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def pretrain(
    model: Qwen3ForCausalLM,
    examples: Sequence[tuple[list[int], int]],
    schedule: Pretraining,
    seed: int,
) -> float:
    """Train `model` as a causal LM on `examples` in place; return the last 20 steps' mean loss.

    AdamW at a fixed number of steps over batches of similar length, gradients clipped to norm 1.
    """
    pad_id = model.config.pad_token_id
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(schedule))
    lengths = [len(ids) for ids, _ in examples]
    batches = length_batches(lengths, schedule.batch_size, random.Random(seed))
    model.train()
    recent: list[float] = []
    steps = bar(
        itertools.islice(batches, schedule.steps),
        total=schedule.steps,
        desc="pretrain the demo model",
        unit="step",
        leave=False,
    )
    for batch in steps:
        input_ids, targets = collate([examples[i] for i in batch], pad_id, schedule.answer_only)
        loss = causal_lm_loss(model, input_ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-19:], loss.item()]
    model.eval()
    return sum(recent) / max(1, len(recent))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads, restoring the process's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_config(tokenizer: PreTrainedTokenizerBase, shape: TinyShape) -> Qwen3Config:
    """Qwen3's config at the demo's size, with Qwen3's special-token wiring.

    The embedding is padded to a multiple of 128 rows beyond the tokenizer's size, as Qwen3's
    is (151,936 rows for 151,669 tokens), so code that confuses the two is caught by the demo.
    """
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return Qwen3Config(
        vocab_size=-(-len(tokenizer) // 128) * 128,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        max_window_layers=shape.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=shape.hidden_size // 4,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},  # Qwen3's theta
        tie_word_embeddings=True,
        bos_token_id=endoftext,  # as in Qwen3's config, though no BOS is ever added
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_qwen3(
    out_dir: Path,
    corpus: Iterable[str],
    seed: int = 0,
    shape: TinyShape = TinyShape(),
    documents: Sequence[tuple[str, str]] = (),
    schedule: Pretraining = Pretraining(),
) -> Path:
    """Save a seeded Qwen3ForCausalLM and its tokenizer (trained on `corpus`) to `out_dir`.

    With `documents`, (question, answer) texts, the model is pretrained on them first, so the
    base model the pipeline starts from writes answers like the data's; without, it stays as
    initialised. Same inputs and seed, same bytes, whatever the core count (the pretraining
    thread count is pinned); a CPU with other vector kernels may round differently.
    """
    tokenizer = train_tokenizer(corpus, shape.vocab_size)
    config = tiny_config(tokenizer, shape)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    if documents:
        with torch_threads(schedule.threads):
            pretrain(model, encode_documents(tokenizer, documents), schedule, seed)
    # Qwen3 stops generating at either end marker; greedy by default (callers choose sampling).
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, config.bos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # transformers 5 always writes model.safetensors
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def ensure_demo_model(cache_dir: Path) -> Path:
    """The tiny Qwen3, pretrained on the demo sample's data/rl answers, with its tokenizer
    trained on all the sample's texts; built once (a complete folder is reused)."""
    target = Path(cache_dir) / MODEL_FOLDER
    if not (target / "config.json").is_file():
        print(
            f"building the demo's tiny Qwen3 into {target} (once: under a minute on 2 cores)",
            file=sys.stderr,
            flush=True,
        )
        # Forked workers of later stages (datasets.map) must not inherit a busy Rust pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        dataset = ensure_demo_dataset(cache_dir)
        documents = pretraining_documents(dataset)
        build_tiny_qwen3(target, sample_texts(dataset), DEMO_SEED, documents=documents)
    return target
