"""The tiny model's tokenizer: byte-level BPE trained on the demo's own texts, with Qwen's special
tokens and a ChatML chat template, so the pipeline's prompt and chat-template paths run on it."""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

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
