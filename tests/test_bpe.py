"""pipeline.data.bpe: tiktoken encodes only for a tokenizer whose ids it reproduces, and then gives
exactly the tokenizer's own ids."""

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from pipeline.data import bpe
from pipeline.data.prompts import _encode_list, encode_many
from tests.test_tokenization import MIXED_TEXTS, spaced_texts

# Texts where two implementations could part: unicode whitespace and case folding in the split
# pattern, text that is not NFC, added tokens mid-text, long runs, digits, CRLF.
HARD_TEXTS = [
    "\u0085\u00a0x\u2028y\u3000z\u180e\u200b\ufeff",
    "'S 'ſ 'LL 'Ve it's",
    "Cafe\u0301 and caf\u00e9",  # the first is not NFC
    "x<|endoftext|>y <|endoftext|> <|endoftext|><|endoftext|>",
    "=" * 3000,
    "a" * 3000,
    "12345678901234567890 3.14159",
    "line\r\nline\r\n\r\n\ttab  \t ",
    "日本語のテキスト🙂👍🏽 한국어 עברית العربية",
]


def test_the_demo_tokenizer_is_encoded_by_tiktoken_with_its_own_ids(demo_tokenizer) -> None:
    encode = bpe.encoder(demo_tokenizer)
    assert encode is not None
    texts = [*MIXED_TEXTS, *HARD_TEXTS, *spaced_texts(2, 300)]
    assert encode_many(demo_tokenizer, texts) == _encode_list(demo_tokenizer, texts)
    assert encode("Cafe\u0301") is None and encode("Caf\u00e9") is not None  # not NFC: tokenizer


def byte_level_bpe(
    merges: list[tuple[str, str]],
    normalizer: normalizers.Normalizer | None = None,
    added: tuple[AddedToken, ...] = (),
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's pre-tokenizer: the 256 bytes, then one token per merge."""
    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    core = Tokenizer(models.BPE(vocab, merges))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    if normalizer is not None:
        core.normalizer = normalizer
    core.add_special_tokens(list(added))
    return PreTrainedTokenizerFast(tokenizer_object=core)


RANK_ORDERED = [("t", "h"), ("th", "e"), ("Ġ", "a"), ("Ġa", "n"), ("Ġan", "d")]


def test_a_rank_ordered_bpe_is_encoded_by_tiktoken() -> None:
    tokenizer = byte_level_bpe(RANK_ORDERED)
    assert bpe.encoder(tokenizer) is not None
    texts = ["the and then", "andthe", *HARD_TEXTS]
    assert encode_many(tokenizer, texts) == _encode_list(tokenizer, texts)


def test_merges_that_rank_order_would_apply_differently_are_left_to_the_tokenizer() -> None:
    """The token abc is merged as (ab, c), yet bc ranks below ab: the tokenizer's merge order
    gives [a, bc] (no merge joins those), tiktoken's rank order [abc]. So no tiktoken here."""
    import tiktoken

    tokenizer = byte_level_bpe([("b", "c"), ("a", "b"), ("ab", "c")])
    assert bpe.encoder(tokenizer) is None
    chars = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks = {bytes(chars[c] for c in token): i for token, i in tokenizer.get_vocab().items()}
    direct = tiktoken.Encoding(
        "x", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={}
    )
    ids = tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert encode_many(tokenizer, ["abc"]) == [ids] == [[ranks[b"a"], ranks[b"bc"]]]
    assert direct.encode("abc") == [ranks[b"abc"]] != ids  # what the check prevents


@pytest.mark.parametrize(
    "tokenizer",
    [
        pytest.param(lambda: byte_level_bpe(RANK_ORDERED, normalizers.NFKC()), id="NFKC"),
        pytest.param(lambda: byte_level_bpe(RANK_ORDERED, normalizers.Lowercase()), id="lowercase"),
        pytest.param(
            lambda: byte_level_bpe(RANK_ORDERED, added=(AddedToken("<x>", lstrip=True),)),
            id="lstrip",
        ),
        pytest.param(
            lambda: byte_level_bpe(RANK_ORDERED, added=(AddedToken("<x>"), AddedToken("<x><y>"))),
            id="added-inside-added",
        ),
        pytest.param(lambda: byte_level_bpe(list(reversed(RANK_ORDERED))), id="merges-unordered"),
    ],
)
def test_what_tiktoken_would_not_reproduce_is_left_to_the_tokenizer(tokenizer) -> None:
    tokenizer = tokenizer()
    assert bpe.encoder(tokenizer) is None
    texts = ["The AND then <x> <x><y>", *HARD_TEXTS]
    assert encode_many(tokenizer, texts) == _encode_list(tokenizer, texts)


def test_a_token_outside_the_byte_alphabet_is_refused() -> None:
    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    assert bpe._ranks(vocab, []) is not None
    for stray in ("\u00ad", "\n", "\u0100\u4e00"):  # not ByteLevel characters
        assert bpe._ranks({**vocab, stray: 256}, []) is None, repr(stray)
