"""The offline demo assets: exact source schema and hub layout, the real set's pairing rule, and a
tiny model folder that loads through the same classes as Qwen/Qwen3-0.6B and writes demo-like
answers."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from demo import dataset as demo_assets
from demo.dataset import (
    DEMO_SEED,
    MAX_PAIRS_PER_QUESTION,
    PROMPT_TEMPLATE,
    SampleSize,
    ensure_demo_dataset,
    generate_stack_exchange_sample,
    pair_rows,
    pretraining_documents,
)
from demo.model import (
    Pretraining,
    TinyShape,
    build_tiny_qwen3,
    causal_lm_loss,
    collate,
    encode_documents,
    ensure_demo_model,
)
from demo.questions import TOPICS, generate_questions

# The hub dataset's schema, spelled out here rather than imported, so a change to either side
# is caught.
EXPECTED_SCHEMA = pa.schema(
    [
        ("qid", pa.int64()),
        ("question", pa.string()),
        ("date", pa.string()),
        ("metadata", pa.list_(pa.string())),
        ("response_j", pa.string()),
        ("response_k", pa.string()),
    ]
)


def read(folder: Path) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet"))).to_pylist()


def by_question(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["metadata"][0]].append(row)
    return grouped


def answer_urls(rows: list[dict]) -> set[str]:
    return {url for row in rows for url in row["metadata"][1:]}


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def train_rows(demo_dataset_dir: Path) -> list[dict]:
    return read(demo_dataset_dir / "data/rl")


@pytest.fixture(scope="module")
def eval_rows(demo_dataset_dir: Path) -> list[dict]:
    return read(demo_dataset_dir / "data/evaluation")


@pytest.fixture(scope="module")
def reward_rows(demo_dataset_dir: Path) -> list[dict]:
    return read(demo_dataset_dir / "data/reward")


@pytest.fixture(scope="module")
def held_out_documents(eval_rows: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) of the first evaluation rows: text the demo model never trained on."""
    return list(dict.fromkeys((r["question"], r["response_j"]) for r in eval_rows[:24]))


# --- dataset ---------------------------------------------------------------------------------


def test_hub_layout_and_exact_schema(demo_dataset_dir: Path) -> None:
    folders = sorted(p.name for p in (demo_dataset_dir / "data").iterdir())
    assert folders == ["evaluation", "reward", "rl"]
    for folder, shards in (("data/rl", 4), ("data/evaluation", 2), ("data/reward", 3)):
        files = sorted((demo_dataset_dir / folder).iterdir())
        assert [f.name for f in files] == [
            f"train-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)
        ]
        for f in files:
            assert pq.read_schema(f).equals(EXPECTED_SCHEMA, check_metadata=False)
            assert pq.read_metadata(f).num_rows > 0


def test_sizes_fit_the_cpu_demo(
    train_rows: list[dict], eval_rows: list[dict], reward_rows: list[dict]
) -> None:
    assert 2000 <= len(train_rows) <= 2600
    assert 350 <= len(eval_rows) <= 500
    assert 1500 <= len(reward_rows) <= 2500
    for row in train_rows + reward_rows:
        assert 8 <= len(row["question"].split()) <= 65
        for text in (row["response_j"], row["response_k"]):
            assert 15 <= len(text.split()) <= 120
        assert row["date"][:4].isdigit() and row["date"][4] == "/" and len(row["date"]) == 10


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> dict[str, str]:
        size = SampleSize(train_questions=40, eval_questions=12, reward_questions=20)
        out = generate_stack_exchange_sample(tmp_path / name, seed=seed, size=size)
        return digest(out)

    first = make("a", 3)
    assert len(first) == 9
    assert first == make("b", 3)
    assert first != make("c", 4)


def test_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fail_on_second_folder(folder: Path, rows: list, shards: int) -> None:
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full")
        folder.mkdir(parents=True)

    monkeypatch.setattr(demo_assets, "_write_shards", fail_on_second_folder)
    with pytest.raises(OSError, match="disk full"):
        size = SampleSize(train_questions=5, eval_questions=3, reward_questions=5)
        generate_stack_exchange_sample(tmp_path / "sample", size=size)
    assert len(calls) == 2  # the first folder was written before the failure
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary sibling


def test_pairing_rule_of_the_real_set() -> None:
    """Only answers of different score are paired, the higher one as response_j, <= 10 each."""
    questions = generate_questions(seed=1, count=300)
    rng = random.Random(0)
    for question in questions:
        assert 2 <= len(question.answers) <= 6
        scores = {a.text: a.score for a in question.answers}
        assert len(set(scores.values())) == len(scores) == len(question.answers)
        rows = pair_rows(question, rng)
        possible = len(question.answers) * (len(question.answers) - 1) // 2
        assert len(rows) == min(possible, MAX_PAIRS_PER_QUESTION)
        assert len({(r["response_j"], r["response_k"]) for r in rows}) == len(rows)
        for row in rows:
            assert scores[row["response_j"]] > scores[row["response_k"]]
            assert row["metadata"][0] == question.url and len(row["metadata"]) == 3
    assert sum(len(q.answers) >= 3 for q in questions) > 0.6 * len(questions)
    assert any(len(q.answers) == 2 for q in questions)


def test_written_pairs_follow_the_rule(
    train_rows: list[dict], eval_rows: list[dict], reward_rows: list[dict]
) -> None:
    folders = (train_rows, eval_rows, reward_rows)
    for rows in itertools.chain.from_iterable(by_question(f).values() for f in folders):
        assert 1 <= len(rows) <= MAX_PAIRS_PER_QUESTION
        assert all(r["response_j"] != r["response_k"] for r in rows)
        assert len({(r["qid"], r["question"], r["date"]) for r in rows}) == 1
        # The labels of one question come from one score order: never both a > b and b > a.
        better = {(r["response_j"], r["response_k"]) for r in rows}
        assert not any((k, j) in better for j, k in better)
    grouped = by_question(eval_rows)
    distinct = [
        len({t for r in rows for t in (r["response_j"], r["response_k"])})
        for rows in grouped.values()
    ]
    assert sum(n >= 3 for n in distinct) > 0.6 * len(distinct)  # rankable questions
    assert max(distinct) == 6


def test_label_noise_flips_only_neighbouring_answers() -> None:
    def inversions(noise: float) -> list[int]:
        counts = []
        for q in generate_questions(seed=2, count=200, label_noise=noise):
            ranked = sorted(q.answers, key=lambda a: a.score, reverse=True)
            counts.append(sum(a.level < b.level for a, b in itertools.combinations(ranked, 2)))
        return counts

    assert set(inversions(0.0)) == {0}  # scores follow the style levels exactly
    assert set(inversions(1.0)) == {1}  # one swap of neighbours flips exactly one pair
    assert 0 < sum(inversions(0.1)) < 0.25 * 200


def test_quality_shows_in_the_text(train_rows: list[dict]) -> None:
    """Graded levels: the best answers explain code in fences and list notes; the worst don't."""
    questions = generate_questions(seed=0, count=200, label_noise=0.0)
    by_level = defaultdict(list)
    for q in questions:
        for a in q.answers:
            by_level[a.level].append(a.text)
    assert set(by_level) == set(range(6))
    assert all("```" in t and "\n- " in t for t in by_level[5])
    assert all("```" in t and "\n- " not in t for t in by_level[4])
    assert all("```" not in t and "`" in t for t in by_level[3])
    assert all("`" not in t for t in by_level[2] + by_level[0])
    chosen = [r["response_j"] for r in train_rows]
    assert sum("```python\n" in t for t in chosen) > 0.1 * len(chosen)
    assert sum("```" in t for t in chosen) > sum("```" in r["response_k"] for r in train_rows)


def test_qids_collide_across_sites(train_rows: list[dict], eval_rows: list[dict]) -> None:
    urls_per_qid: dict[int, set[str]] = defaultdict(set)
    for row in train_rows + eval_rows:
        url = row["metadata"][0]
        assert url.startswith("https://") and url.endswith(f"/questions/{row['qid']}")
        assert all(u.startswith(url.split("/questions/")[0] + "/a/") for u in row["metadata"][1:])
        urls_per_qid[row["qid"]].add(url)
    colliding = [urls for urls in urls_per_qid.values() if len(urls) > 1]
    assert len(colliding) >= 5
    sites = {url.split("/")[2] for url in itertools.chain(*urls_per_qid.values())}
    assert len(sites) >= 4 and any(s.endswith(".stackexchange.com") for s in sites)


def test_eval_overlap_is_small_but_planted(train_rows: list[dict], eval_rows: list[dict]) -> None:
    train_urls, eval_urls = set(by_question(train_rows)), set(by_question(eval_rows))
    shared = train_urls & eval_urls
    assert 0 < len(shared) <= 0.05 * len(eval_urls | train_urls)
    for url in shared:  # the same question, not merely the same qid
        assert {r["question"] for r in by_question(train_rows)[url]} == {
            r["question"] for r in by_question(eval_rows)[url]
        }


def test_reward_questions_are_new_but_for_planted_eval_ones(
    train_rows: list[dict], eval_rows: list[dict], reward_rows: list[dict]
) -> None:
    """data/reward asks its own questions, plus a few evaluation questions planted whole, so the
    pipeline's rule "no held-out question in the reward data" has something to remove."""
    train, evaluation = by_question(train_rows), by_question(eval_rows)
    reward = by_question(reward_rows)
    assert not set(reward) & set(train)
    planted = set(reward) & set(evaluation)
    assert len(planted) == 8
    assert not planted & set(train)  # other evaluation questions than the ones data/rl got
    for url in planted:  # the same question with the same pairs, not merely the same URL
        assert sorted(map(str, reward[url])) == sorted(map(str, evaluation[url]))
    new = [r for r in reward_rows if r["metadata"][0] not in planted]
    assert not answer_urls(new) & answer_urls(train_rows + eval_rows)  # answers are unique too


def test_reward_folder_never_shifts_train_or_eval(tmp_path: Path) -> None:
    def make(name: str, reward_questions: int) -> dict[str, str]:
        out = tmp_path / name
        size = SampleSize(train_questions=40, eval_questions=20, reward_questions=reward_questions)
        generate_stack_exchange_sample(out, seed=1, size=size)
        return {k: v for k, v in digest(out).items() if not k.startswith("data/reward/")}

    assert make("small", 10) == make("large", 40)


def test_pretraining_documents_hold_out_evaluation(
    demo_dataset_dir: Path, train_rows: list[dict], eval_rows: list[dict]
) -> None:
    documents = pretraining_documents(demo_dataset_dir)
    assert len(documents) == len(set(documents))
    held_out = set(by_question(eval_rows))
    kept = [r for r in train_rows if r["metadata"][0] not in held_out]
    assert len(kept) < len(train_rows)  # the planted evaluation questions were left out...
    planted = {r["question"] for r in train_rows if r["metadata"][0] in held_out}
    assert not planted & {q for q, _ in documents}  # ...with every answer they have
    expected = {(r["question"], r[side]) for r in kept for side in ("response_j", "response_k")}
    assert set(documents) == expected  # chosen and rejected answers alike


def test_rows_are_shuffled_across_shards(demo_dataset_dir: Path) -> None:
    shards_of: dict[str, list[int]] = defaultdict(list)
    for i, path in enumerate(sorted((demo_dataset_dir / "data/rl").glob("*.parquet"))):
        for meta in pq.read_table(path, columns=["metadata"])["metadata"].to_pylist():
            shards_of[meta[0]].append(i)
    # Questions with several pairs: writing them grouped would put most in a single shard.
    spread = [len(set(shards)) > 1 for shards in shards_of.values() if len(shards) >= 3]
    assert len(spread) > 100 and sum(spread) > 0.7 * len(spread)


def test_ensure_reuses_a_complete_build(
    asset_cache: Path, demo_dataset_dir: Path, demo_model_dir: Path
) -> None:
    before = {p: p.stat().st_mtime_ns for p in asset_cache.rglob("*") if p.is_file()}
    assert ensure_demo_dataset(asset_cache) == demo_dataset_dir
    assert ensure_demo_model(asset_cache) == demo_model_dir
    after = {p: p.stat().st_mtime_ns for p in asset_cache.rglob("*") if p.is_file()}
    assert before == after
    assert demo_assets.VERSION in demo_dataset_dir.name
    assert demo_assets.VERSION in demo_model_dir.name


# --- tokenizer and model ---------------------------------------------------------------------


def test_tokenizer_is_qwens_class_with_qwens_specials(demo_tokenizer) -> None:
    assert type(demo_tokenizer).__name__ == "Qwen2Tokenizer"  # what Qwen3-0.6B loads as
    assert demo_tokenizer.bos_token is None
    assert demo_tokenizer.eos_token == "<|im_end|>"
    assert demo_tokenizer.pad_token == "<|endoftext|>"
    ids = demo_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    n = len(demo_tokenizer)
    assert ids == [n - 3, n - 2, n - 1]  # appended after the learned vocabulary, in Qwen's order
    assert demo_tokenizer.eos_token_id == n - 1 and demo_tokenizer.pad_token_id == n - 3
    marked = demo_tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert marked[0] == ids[1] and marked[-1] == ids[2]  # a special in text is one token
    assert [i for i in marked if i in ids] == ids[1:]
    assert len(demo_tokenizer) > 1000  # BPE learned merges, not only the 256 bytes


@pytest.mark.parametrize(
    "text",
    [
        "Question: Why?\n\nAnswer: ",
        "```python\nfor i in range(10):\n    print(f'{i:03d}')\n```\n",
        "a  b\n\n\tc \r\n   trailing   ",
        "naïve café — 你好 🙂 ∑x² ✓",
        "SELECT * FROM t WHERE name = 'O''Brien';",
    ],
)
def test_tokenizer_round_trips_and_adds_no_bos(demo_tokenizer, text: str) -> None:
    ids = demo_tokenizer(text)["input_ids"]
    assert ids == demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not set(ids) & set(demo_tokenizer.all_special_ids)
    assert demo_tokenizer.decode(ids) == text


def test_tokenizer_normalizes_unicode_like_qwen(demo_tokenizer) -> None:
    # Qwen2Tokenizer applies NFC: a combining accent comes back composed, as with Qwen3 itself.
    assert demo_tokenizer.decode(demo_tokenizer("e\u0301")["input_ids"]) == "\u00e9"


def test_chat_template_renders_qwen_blocks(demo_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = demo_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    prompt = demo_tokenizer.apply_chat_template(
        messages[1:], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_model_is_a_qwen3_with_safetensors_only(demo_model_dir: Path, demo_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    assert (demo_model_dir / "model.safetensors").is_file()
    assert not [p for ext in ("*.bin", "*.pt", "*.pth") for p in demo_model_dir.glob(ext)]
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    config = model.config
    assert config.eos_token_id == demo_tokenizer.eos_token_id
    assert config.pad_token_id == demo_tokenizer.pad_token_id
    assert config.vocab_size >= len(demo_tokenizer) and config.vocab_size % 128 == 0
    assert config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.generation_config.eos_token_id == [
        demo_tokenizer.eos_token_id,
        demo_tokenizer.pad_token_id,
    ]
    assert 50_000 < model.num_parameters() < 2_000_000
    batch = demo_tokenizer(
        ["How do I sort?", "Use `sorted()` with a key."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_model_build_is_seeded(tmp_path: Path) -> None:
    """Same corpus, documents and seed: same bytes, pretraining included; the thread count the
    build pins is given back."""
    corpus = [f"Use `sorted()` on list {i}.\n\n```python\nx = sorted(y)\n```" for i in range(50)]
    documents = [(f"How do I sort list {i}?", text) for i, text in enumerate(corpus[:12])]
    threads = torch.get_num_threads()

    def build(name: str, seed: int, docs: list[tuple[str, str]] = documents) -> dict[str, str]:
        schedule = Pretraining(steps=4, batch_size=4)
        shape = TinyShape(vocab_size=300)
        return digest(build_tiny_qwen3(tmp_path / name, corpus, seed, shape, docs, schedule))

    a, b, c, d = build("a", 5), build("b", 5), build("c", 6), build("d", 5, [])
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["model.safetensors"] != d["model.safetensors"]  # pretraining moved the weights
    assert a["tokenizer.json"] == c["tokenizer.json"]  # the tokenizer depends on the corpus only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "d"]  # no leftovers
    assert torch.get_num_threads() == threads


def answer_loss(model: torch.nn.Module, tokenizer, documents: list[tuple[str, str]]) -> float:
    """Mean loss per answer token (EOS included) of `model` on (question, answer) documents."""
    examples = encode_documents(tokenizer, documents)
    input_ids, targets = collate(examples, tokenizer.pad_token_id, answer_only=True)
    with torch.no_grad():
        return causal_lm_loss(model, input_ids, targets).item()


def test_pretrained_model_predicts_held_out_answers(
    demo_model_dir: Path, demo_tokenizer, held_out_documents: list[tuple[str, str]]
) -> None:
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    torch.manual_seed(DEMO_SEED)
    untrained = Qwen3ForCausalLM(model.config).eval()  # the same shape, as initialised
    trained_loss = answer_loss(model, demo_tokenizer, held_out_documents)
    untrained_loss = answer_loss(untrained, demo_tokenizer, held_out_documents)
    assert untrained_loss > 6.0  # about log(vocabulary): nothing learned
    assert trained_loss < 1.0 and trained_loss < 0.15 * untrained_loss


def test_base_model_answers_in_the_demo_style(
    demo_model_dir: Path, demo_tokenizer, held_out_documents: list[tuple[str, str]]
) -> None:
    """Greedy answers to held-out questions in the pipeline's prompt: they end with EOS, and the
    ones with code name the API of the question's own topic."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    questions = list(dict.fromkeys(q for q, _ in held_out_documents))[:8]
    ended, coded, on_topic = 0, 0, 0
    for question in questions:
        prompt = PROMPT_TEMPLATE.replace("{question}", question)
        ids = demo_tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=128, do_sample=False)[
            0, ids.input_ids.shape[1] :
        ]
        ended += out[-1].item() in model.generation_config.eos_token_id
        answer = demo_tokenizer.decode(out, skip_special_tokens=True)
        topic = next(t for t in TOPICS if t.task in question.split("\n")[0])
        coded += "```" in answer
        on_topic += "```" in answer and topic.api in answer
    assert ended >= 6
    assert coded >= 2 and on_topic >= coded / 2
