"""The offline demo's model: a tiny, untrained Qwen3 with a tokenizer trained on the demo pairs.

A randomly initialised Qwen3ForCausalLM with a byte-level BPE tokenizer, saved as an ordinary HF
folder that loads through the same classes as `Qwen/Qwen3-0.6B` (Qwen2Tokenizer with Qwen's
pre-tokenizer, specials, chat template; safetensors weights), so the demo exercises the real
loading code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.trainers import BpeTrainer
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from pipeline.demo.dataset import DEMO_SEED, MODEL_FOLDER, ensure_demo_dataset, sample_texts
from pipeline.stage_io import atomic_dir

# Qwen's special tokens in Qwen's order, appended after the learned vocabulary as in Qwen3.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen-style chat template: one <|im_start|>role ... <|im_end|> block per message; the generation
# prompt opens the assistant turn. Qwen adds no BOS, so neither does the template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerBase:
    """Byte-level BPE trained on `corpus`, wrapped as Qwen3's own tokenizer class (Qwen2Tokenizer).

    Training uses Qwen's normalizer and pre-tokenizer split, so the learned merges mean the same
    thing when Qwen2Tokenizer rebuilds its pipeline from vocab and merges at load time.
    `vocab_size` counts learned tokens; the three specials come after them, as in Qwen.
    """
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown token
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(core.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in model["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        add_prefix_space=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


@dataclasses.dataclass(frozen=True)
class TinyShape:
    """The demo model's size: it learns the demo's preferences on a CPU in a minute."""

    vocab_size: int = 2048  # learned tokens; Qwen's three specials come after them
    hidden_size: int = 64
    num_layers: int = 2
    intermediate_size: int = 192


def build_tiny_qwen3(
    out_dir: Path, corpus: Iterable[str], seed: int = 0, shape: TinyShape = TinyShape()
) -> Path:
    """Save a seeded, randomly initialised Qwen3ForCausalLM and its tokenizer to `out_dir`.

    The embedding is padded to a multiple of 128 rows beyond the tokenizer's size, as Qwen3's
    is (151,936 rows for 151,669 tokens), so code that confuses the two is caught by the demo.
    """
    tokenizer = train_tokenizer(corpus, shape.vocab_size)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
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
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # Qwen3 stops generating at either end marker; greedy by default (callers choose sampling).
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[tokenizer.eos_token_id, endoftext],
        pad_token_id=tokenizer.pad_token_id,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # transformers 5 always writes model.safetensors
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def ensure_demo_model(cache_dir: Path) -> Path:
    """The tiny Qwen3, its tokenizer trained on the demo sample's texts; built once."""
    target = Path(cache_dir) / MODEL_FOLDER
    if not (target / "config.json").is_file():
        # Forked workers of later stages (datasets.map) must not inherit a busy Rust pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        build_tiny_qwen3(target, sample_texts(ensure_demo_dataset(cache_dir)), seed=DEMO_SEED)
    return target
