import dataclasses
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from pipeline.data import tokenization
from pipeline.data.prompts import encode_completion, render_prompt
from pipeline.data.schema import SUBSAMPLED_SCHEMA, SchemaError, load_tokenized
from pipeline.data.tokenization import TooManyDropped, tokenize_pairs, tokenize_split
from pipeline.params import TokenizeParams
from tests.helpers import pairs, random_pairs, source_rows, table, tokenize_pair, with_ids

PARAMS = TokenizeParams(
    template="Question: {question}\n\nAnswer: ",
    use_chat_template=False,
    max_length=64,
    max_prompt_length=32,
    max_drop_share=1.0,
    num_proc=1,
    pairs_per_shard=100,
)


def test_prompt_and_completion_round_trip_at_the_boundary(demo_tokenizer) -> None:
    question, answer = "Why does `x=[]` leak?", "Because the default\nis shared:\n```py\nf()\n```"
    pair = tokenize_pair(demo_tokenizer, question, answer, "no", PARAMS)
    assert pair.drop_reason == ""
    assert demo_tokenizer.decode(pair.prompt) == render_prompt(demo_tokenizer, question, PARAMS)
    assert pair.chosen[-1] == demo_tokenizer.eos_token_id
    assert demo_tokenizer.decode(pair.chosen[:-1]) == answer
    # Separate tokenization: the concatenation decodes to exactly prompt text + answer text.
    assert (
        demo_tokenizer.decode(pair.prompt + pair.chosen[:-1])
        == f"Question: {question}\n\nAnswer: {answer}"
    )


def test_eos_is_appended_exactly_once(demo_tokenizer) -> None:
    eos = demo_tokenizer.eos_token_id
    plain = encode_completion(demo_tokenizer, "Use a set.")
    already = encode_completion(demo_tokenizer, "Use a set." + demo_tokenizer.eos_token)
    assert plain == already and plain.count(eos) == 1 and plain[-1] == eos


def test_no_special_tokens_are_added(demo_tokenizer) -> None:
    pair = tokenize_pair(demo_tokenizer, "What is a list?", "A sequence.", "Nothing.", PARAMS)
    specials = set(demo_tokenizer.all_special_ids)
    assert not specials & set(pair.prompt)  # no BOS, no template markers in the plain template
    assert [t for t in pair.chosen if t in specials] == [demo_tokenizer.eos_token_id]


def test_chat_template_markers_appear_once(demo_tokenizer) -> None:
    params = dataclasses.replace(PARAMS, use_chat_template=True)
    pair = tokenize_pair(demo_tokenizer, "What is a list?", "A sequence.", "Nothing.", params)
    start = demo_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert pair.prompt.count(start) == 2  # the user turn and the assistant header, nothing doubled
    text = demo_tokenizer.decode(pair.prompt)
    assert text.startswith("<|im_start|>user\nWhat is a list?")
    assert text.rstrip().endswith("assistant")


def test_long_question_is_cut_but_the_template_tail_survives(demo_tokenizer) -> None:
    question = "word " * 200
    pair = tokenize_pair(demo_tokenizer, question, "Fine.", "Bad.", PARAMS)
    assert len(pair.prompt) <= PARAMS.max_prompt_length and pair.truncated[0]
    assert demo_tokenizer.decode(pair.prompt).endswith("\n\nAnswer: ")


def test_long_completions_keep_their_start(demo_tokenizer) -> None:
    long_answer = "alpha beta gamma " * 100
    pair = tokenize_pair(demo_tokenizer, "Q?", long_answer, "short", PARAMS)
    assert len(pair.prompt) + len(pair.chosen) == PARAMS.max_length
    assert pair.truncated == (False, True, False)
    assert long_answer.startswith(demo_tokenizer.decode(pair.chosen))


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("", "an answer", "empty_completion"),
        ("an answer", "   \n", "empty_completion"),
        (None, "an answer", "empty_completion"),
        ("same answer", "same answer", "identical_completions"),
    ],
)
def test_bad_pairs_are_dropped_with_a_reason(demo_tokenizer, chosen, rejected, reason) -> None:
    assert tokenize_pair(demo_tokenizer, "Q?", chosen, rejected, PARAMS).drop_reason == reason


def test_prompt_leaving_no_room_is_dropped(demo_tokenizer) -> None:
    params = dataclasses.replace(PARAMS, max_length=33, max_prompt_length=32)
    pair = tokenize_pair(demo_tokenizer, "word " * 100, "Fine.", "Bad.", params)
    assert pair.drop_reason == "no_room_for_answer"


def test_identical_after_truncation_is_dropped(demo_tokenizer) -> None:
    shared = "the same long start " * 40
    pair = tokenize_pair(demo_tokenizer, "Q?", shared + "good end", shared + "bad end", PARAMS)
    assert pair.drop_reason == "identical_completions"


def crafted_dataset() -> datasets.Dataset:
    rows = source_rows(6, 1)
    rows[0]["response_j"] = ""  # empty
    rows[1]["response_k"] = rows[1]["response_j"]  # identical
    rows[2]["response_j"] = "long " * 300  # truncated
    return datasets.Dataset(with_ids(pairs(table(rows))).cast(SUBSAMPLED_SCHEMA))


def split_file(folder, dataset: datasets.Dataset):
    """A subsampled split as the subsample stage writes it, with one extra column."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    table = dataset.data.table.append_column("extra", pa.array(["x"] * len(dataset)))
    pq.write_table(table, folder / "data.parquet")
    return folder / "data.parquet"


def test_the_report_counts_drops_and_truncations(demo_tokenizer, tmp_path) -> None:
    source = split_file(tmp_path / "subsampled", crafted_dataset())
    report = tokenize_split(source, tmp_path / "tokenized" / "train", demo_tokenizer, PARAMS)
    kept = load_tokenized(tmp_path / "tokenized" / "train")
    assert report["pairs_in"] == 6 and report["pairs_kept"] == 4 == len(kept)
    assert report["dropped"] == {
        "empty_completion": 1,
        "identical_completions": 1,
        "no_room_for_answer": 0,
    }
    assert report["truncated"] == {"prompt": 0, "chosen": 1, "rejected": 0}
    assert report["lengths"]["pair_total"]["max"] <= PARAMS.max_length
    assert kept.column_names == [
        "question_id",
        "pair_id",
        "prompt_input_ids",
        "chosen_input_ids",
        "rejected_input_ids",
    ]


def test_too_many_drops_fail_loudly_and_leave_nothing(demo_tokenizer, tmp_path) -> None:
    source = split_file(tmp_path / "subsampled", crafted_dataset())
    params = dataclasses.replace(PARAMS, max_drop_share=0.2)
    with pytest.raises(TooManyDropped, match=r"tokenize train: dropped 33.3% .*empty_completion"):
        tokenize_split(source, tmp_path / "again" / "train", demo_tokenizer, params)
    assert list((tmp_path / "again").iterdir()) == []


def test_a_split_with_every_pair_dropped_saves_an_empty_split(demo_tokenizer, tmp_path) -> None:
    rows = source_rows(3, 1)
    for row in rows:
        row["response_k"] = row["response_j"]
    subsampled = datasets.Dataset(with_ids(pairs(table(rows))).cast(SUBSAMPLED_SCHEMA))
    source = split_file(tmp_path / "subsampled", subsampled)
    report = tokenize_split(source, tmp_path / "tokenized" / "train", demo_tokenizer, PARAMS)
    assert (report["pairs_in"], report["pairs_kept"], report["shards"]) == (3, 0, 1)
    assert len(load_tokenized(tmp_path / "tokenized" / "train")) == 0


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_split_is_each_pair_tokenized_alone_in_shards(
    demo_tokenizer, tmp_path, monkeypatch, num_proc
) -> None:
    """tokenize_split, in process or by two workers, tasks and shards smaller than the split:
    the kept rows are `tokenize_pairs`' in the source's order, extra columns are ignored, the
    shards hold pairs_per_shard pairs each, and no scratch folder is left."""
    monkeypatch.setattr(tokenization, "TASK_PAIRS", 7)
    monkeypatch.setattr(tokenization, "WORKERS_FROM", 1)
    rows = source_rows(60, 1)
    rows[3]["response_k"] = rows[3]["response_j"]  # dropped
    subsampled = datasets.Dataset(with_ids(pairs(table(rows))).cast(SUBSAMPLED_SCHEMA))
    source = split_file(tmp_path / "subsampled", subsampled)
    out = tmp_path / "tokenized" / "train"
    params = dataclasses.replace(PARAMS, num_proc=num_proc, pairs_per_shard=25)
    report = tokenize_split(source, out, demo_tokenizer, params)

    column = subsampled.data.table.column
    alone = tokenize_pairs(
        demo_tokenizer, *(column(c).to_pylist() for c in ("question", "chosen", "rejected")), params
    )
    kept = [i for i, pair in enumerate(alone) if not pair.drop_reason]
    written = load_tokenized(out)
    assert written["pair_id"] == column("pair_id").to_numpy()[kept].tolist()
    assert written["prompt_input_ids"] == [alone[i].prompt for i in kept]
    assert written["chosen_input_ids"] == [alone[i].chosen for i in kept]
    assert written["rejected_input_ids"] == [alone[i].rejected for i in kept]
    assert (report["pairs_in"], report["pairs_kept"]) == (len(rows), len(kept))
    assert report["shards"] == len(written.cache_files) == 3  # 59 pairs, 25 a shard
    files = [f["filename"] for f in written.cache_files]
    assert [pa.ipc.open_stream(f).read_all().num_rows for f in files] == [25, 25, 9]
    assert all(Path(f["filename"]).parent == out for f in written.cache_files)
    assert sorted(p.name for p in out.parent.iterdir()) == ["train"]


def test_a_tokenized_split_is_checked_on_read(tmp_path) -> None:
    """Every reader (reference, train, evaluate) loads through `load_tokenized`: the columns
    tokenize writes come back; another type or a missing split is an error naming the folder."""
    good, wrong = tmp_path / "good", tmp_path / "wrong"
    random_pairs(4).save_to_disk(str(good))
    assert load_tokenized(good)["chosen_input_ids"] == random_pairs(4)["chosen_input_ids"]
    int64 = datasets.List(datasets.Value("int64"))
    int64 = datasets.Features({**random_pairs(1).features, "chosen_input_ids": int64})
    random_pairs(4).cast(int64).save_to_disk(str(wrong))
    with pytest.raises(SchemaError, match=f"{wrong}: column 'chosen_input_ids' has type"):
        load_tokenized(wrong)
    with pytest.raises(SchemaError, match="no tokenized split there: run the tokenize stage"):
        load_tokenized(tmp_path / "missing")


MIXED_TEXTS = [
    "",
    "   ",
    "Plain words.",
    "Unicode: naïve café — 日本語のテキスト, emoji 🙂 and ß.",
    "Code:\n```python\nfor i in range(3):\n    print(f'{i!r}')\n```\n",
    "over budget " * 80,
    "ends with the end token<|endoftext|>",
]


def test_batched_encoding_gives_each_texts_own_ids(demo_tokenizer) -> None:
    """One tokenizer call for a list (the map's batches) gives the ids of one call per text."""
    from pipeline.data.prompts import encode, encode_completions, encode_many

    assert encode_many(demo_tokenizer, MIXED_TEXTS) == [
        encode(demo_tokenizer, t) for t in MIXED_TEXTS
    ]
    assert encode_completions(demo_tokenizer, MIXED_TEXTS) == [
        encode_completion(demo_tokenizer, t) for t in MIXED_TEXTS
    ]
    assert encode_many(demo_tokenizer, []) == []


def test_a_batch_of_pairs_is_each_pair_tokenized_alone(demo_tokenizer) -> None:
    """Fitting and over-budget prompts, empty and identical answers: the batch decides as the
    pair alone does."""

    questions = [*MIXED_TEXTS, None]
    chosen = [*reversed(MIXED_TEXTS), "x"]
    rejected = [*MIXED_TEXTS[1:], MIXED_TEXTS[0], None]
    batch = tokenize_pairs(demo_tokenizer, questions, chosen, rejected, PARAMS)
    alone = [
        tokenize_pair(demo_tokenizer, q, c, r, PARAMS)
        for q, c, r in zip(questions, chosen, rejected, strict=True)
    ]
    assert batch == alone
    assert {p.drop_reason for p in batch} >= {"", "empty_completion"}
    assert any(p.truncated[0] for p in batch) and any(not p.truncated[0] for p in batch)


def one_at_a_time(tokenizer, question: str, params: TokenizeParams) -> tuple[list[int], bool]:
    """The previous prompt rule for one question, call by call: decode the question's first
    tokens and re-encode the prompt until it fits. The reference for the one-step cut."""
    from pipeline.data.prompts import encode

    ids = encode(tokenizer, render_prompt(tokenizer, question, params))
    if len(ids) <= params.max_prompt_length:
        return ids, False
    question_ids = encode(tokenizer, question)
    keep = max(len(question_ids) - (len(ids) - params.max_prompt_length), 0)
    while True:
        ids = encode(
            tokenizer, render_prompt(tokenizer, tokenizer.decode(question_ids[:keep]), params)
        )
        if len(ids) <= params.max_prompt_length or keep == 0:
            return ids[: params.max_prompt_length], True
        keep = max(keep - (len(ids) - params.max_prompt_length), 0)


@pytest.mark.parametrize("budget", [4, 12, 32, 200])
def test_the_prompt_cut_keeps_the_template_and_a_clean_question_start(
    demo_tokenizer, budget: int
) -> None:
    """Fitting and over-budget questions (unicode, code, empty, a template longer than the
    budget) in one batch. A fitting prompt has the ids of the previous rule. An over-budget one
    fits, keeps the template's head and tail, keeps at least as many tokens as the previous
    rule, and its question is a start of the real question: cut at a token's end in the text,
    never inside a character (the previous rule kept a broken byte of 日本 as U+FFFD)."""
    from pipeline.data.prompts import encode, encode_prompts

    params = dataclasses.replace(PARAMS, max_prompt_length=budget, max_length=budget + 8)
    questions = [*MIXED_TEXTS, "How do I " + "really " * 30 + "sort?"]
    head, tail = PARAMS.template.split("{question}")
    template_tokens = len(encode(demo_tokenizer, head + tail))
    got = encode_prompts(demo_tokenizer, questions, params)
    for question, (ids, cut) in zip(questions, got, strict=True):
        before, was_cut = one_at_a_time(demo_tokenizer, question, params)
        assert cut == was_cut and len(ids) <= budget, question
        if not cut:
            assert ids == before, question
        elif budget > template_tokens:
            text = demo_tokenizer.decode(ids)
            assert len(ids) >= len(before) and text.startswith(head) and text.endswith(tail)
            kept = text[len(head) : len(text) - len(tail)]
            assert question.startswith(kept) and "\ufffd" not in kept, (question, kept)
    assert any(cut for _, cut in got)


def spaced_texts(seed: int, count: int) -> list[str]:
    """Texts built to cut badly: space runs, tabs, newlines after punctuation, unicode, code,
    end tokens in the middle, long unbroken words."""
    import random

    rng = random.Random(seed)
    pieces = [*MIXED_TEXTS, "word", " ", "  ", "\t", ".\n", "e\u0301", "'s", "1234", "x" * 40]
    pieces += ["<|endoftext|>", " <|endoftext|>", "—", "日本語"]
    return [
        "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 60)))
        for _ in range(count)
    ]


def test_completion_heads_are_the_whole_texts_first_ids(demo_tokenizer, monkeypatch) -> None:
    """A long answer is encoded only as far as the pair can keep, with the same ids as the whole
    text's first ones (unicode, code, space runs, end tokens mid-text, empty and dense texts)."""
    from pipeline.data import prompts

    texts = [*MIXED_TEXTS, *spaced_texts(0, 400), "word " * 20_000]
    lengths = [1 + (7 * i) % 90 for i in range(len(texts))]
    full = prompts.encode_completions(demo_tokenizer, texts)
    encode_many, encoded = prompts.encode_many, []

    def recording(tokenizer, batch: list[str]) -> list[list[int]]:
        encoded.extend(batch)
        return encode_many(tokenizer, batch)

    monkeypatch.setattr(prompts, "encode_many", recording)
    heads = prompts.completion_heads(demo_tokenizer, texts, lengths)
    assert [ids[:n] for ids, n in zip(full, lengths, strict=True)] == heads
    assert max(len(text) for text in encoded) < 1_000  # the 100,000-character text was cut


@pytest.mark.slow
def test_a_text_cut_at_a_space_cut_point_keeps_its_ids(demo_tokenizer) -> None:
    """What `completion_heads` rests on, at every cut point of varied texts: the ids of the
    text's start are the first ids of the whole text, up to the start's last token."""
    from pipeline.data.prompts import _space_cut, encode, encode_many

    for text in spaced_texts(1, 40):
        whole = encode(demo_tokenizer, text)
        cuts = sorted({_space_cut(text, start) for start in range(len(text))})
        heads = encode_many(demo_tokenizer, [text[:c] for c in cuts])
        for cut, head in zip(cuts, heads, strict=True):
            assert head == whole[: len(head)], (text, cut)


def test_other_tokenizers_encode_whole_texts(tmp_path) -> None:
    """A tokenizer whose pre-tokens may span a cut point (here Metaspace, which joins a space to
    the word after it) gets its texts encoded whole: the ids are still the whole text's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data import prompts

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "</s>": 3}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")
    assert not prompts._cuts_at_spaces(tokenizer)
    texts = ["a b " * 50, "b a"]
    full = prompts.encode_completions(tokenizer, texts)
    assert prompts.completion_heads(tokenizer, texts, [5, 9]) == [full[0][:5], full[1][:9]]
