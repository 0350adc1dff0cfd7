"""The offline demo assets: exact source schema, the real set's pairing rule, a loadable Qwen3."""

import hashlib
import itertools
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.demo_assets import generate_rows, generate_stack_exchange_sample
from pipeline.schema import SOURCE_SCHEMA


def read(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet")))


def test_hub_layout_and_exact_schema(demo_dataset_dir: Path) -> None:
    for folder, shards in (("data/rl", 4), ("data/evaluation", 2)):
        files = sorted((demo_dataset_dir / folder).glob("*.parquet"))
        assert [f.name for f in files] == [
            f"train-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)
        ]
        for f in files:
            assert pq.read_schema(f).equals(SOURCE_SCHEMA, check_metadata=False)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    def digest(root: Path) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))]

    a = generate_stack_exchange_sample(
        tmp_path / "a", seed=3, train_questions=30, eval_questions=10
    )
    b = generate_stack_exchange_sample(
        tmp_path / "b", seed=3, train_questions=30, eval_questions=10
    )
    c = generate_stack_exchange_sample(
        tmp_path / "c", seed=4, train_questions=30, eval_questions=10
    )
    assert digest(a) == digest(b) != digest(c)


def test_pairing_rule_of_the_real_set() -> None:
    groups = generate_rows(seed=0, questions=300, label_noise=0.0)
    for rows in groups:
        assert 1 <= len(rows) <= 10  # at most 10 pairs per question
        answers = {r["response_j"] for r in rows} | {r["response_k"] for r in rows}
        assert 2 <= len(answers) <= 6
        assert all(r["response_j"] != r["response_k"] for r in rows)
    # Preference is transitive within a question when no label is flipped: a strict order.
    for rows in groups:
        better = defaultdict(set)
        for r in rows:
            better[r["response_j"]].add(r["response_k"])
        for a, b in itertools.permutations(better, 2):
            assert not (b in better[a] and a in better[b])
    assert (
        sum(len({r["response_j"] for r in g} | {r["response_k"] for r in g}) >= 3 for g in groups)
        > 150
    )


def test_label_noise_flips_some_pairs() -> None:
    clean = generate_rows(seed=0, questions=200, label_noise=0.0)
    noisy = generate_rows(seed=0, questions=200, label_noise=0.5)
    pairs = list(zip(itertools.chain(*clean), itertools.chain(*noisy), strict=True))
    flipped = sum(
        n["response_j"] == c["response_k"] and n["response_k"] == c["response_j"] for c, n in pairs
    )
    assert 0.4 < flipped / len(pairs) < 0.6
    unchanged = sum(n == c for c, n in pairs)
    assert flipped + unchanged == len(pairs)  # a flip swaps the answers and nothing else


def test_qids_collide_across_sites_and_eval_overlap_is_planted(demo_dataset_dir: Path) -> None:
    train = read(demo_dataset_dir / "data/rl")
    evaluation = read(demo_dataset_dir / "data/evaluation")
    urls_per_qid = defaultdict(set)
    for qid, meta in zip(train["qid"].to_pylist(), train["metadata"].to_pylist(), strict=True):
        urls_per_qid[qid].add(meta[0])
        assert meta[0].startswith("https://") and f"/questions/{qid}" in meta[0]
    assert any(len(urls) > 1 for urls in urls_per_qid.values())
    train_urls = {m[0] for m in train["metadata"].to_pylist()}
    eval_urls = {m[0] for m in evaluation["metadata"].to_pylist()}
    assert 0 < len(train_urls & eval_urls) <= 5
    assert len(train) > 2000 and len(evaluation) > 300


def test_answers_are_markdown_with_code_fences(demo_dataset_dir: Path) -> None:
    chosen = read(demo_dataset_dir / "data/rl")["response_j"].to_pylist()
    assert sum("```" in text for text in chosen) > len(chosen) / 3
    assert any("`" in text and "```" not in text for text in chosen)  # inline code too


def test_tokenizer_specials_round_trip_and_chat_template(demo_tokenizer) -> None:
    text = "Question: Why?\n\nAnswer: ```python\nx = [1, 2]\n```\n\tünïcode ✓"
    ids = demo_tokenizer(text)["input_ids"]
    assert demo_tokenizer.decode(ids) == text
    assert demo_tokenizer.bos_token is None and ids[0] not in demo_tokenizer.all_special_ids
    assert demo_tokenizer.eos_token == "<|im_end|>" and demo_tokenizer.pad_token == "<|endoftext|>"
    assert demo_tokenizer.convert_tokens_to_ids("<|im_start|>") != demo_tokenizer.unk_token_id
    rendered = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_model_is_a_qwen3_with_safetensors_only(demo_model_dir: Path, demo_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    assert (demo_model_dir / "model.safetensors").is_file()
    assert not list(demo_model_dir.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.eos_token_id == demo_tokenizer.eos_token_id
    assert model.config.pad_token_id == demo_tokenizer.pad_token_id
    ids = torch.tensor([demo_tokenizer("How do I sort?")["input_ids"]] * 2)
    assert model(ids).logits.shape == (2, ids.shape[1], model.config.vocab_size)
    assert model.config.vocab_size >= len(demo_tokenizer)
