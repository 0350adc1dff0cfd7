"""The reward model: the Bradley-Terry loss by hand and against TRL's RewardTrainer, scoring and
pair accuracy, training on the demo pairs, the input format, and the held-out question filter."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from demo.dataset import SOURCE_SCHEMA
from pipeline.data.prompts import encode_prompt
from pipeline.data.schema import PAIRS_SCHEMA
from pipeline.judge import reward as reward_module
from pipeline.judge.build import reward_format, without_questions
from pipeline.judge.reward import (
    RewardFormat,
    _padded,
    bradley_terry_loss,
    load_reward_model,
    pair_accuracy,
    pair_rows,
    rewards,
    score_rows,
    train_reward_model,
)
from pipeline.model.loading import pad_token_id
from pipeline.params import JudgeParams, Params, load_params
from tests.helpers import CPU, REPO, pairs, read_pairs

# One intra-op thread per test module (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

Pairs = list[tuple[list[int], list[int]]]


@pytest.fixture(scope="module")
def repo_params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def tok(demo_model_dir: Path) -> PreTrainedTokenizerBase:
    # A private copy: TRL sets attributes on the tokenizer it is given.
    return AutoTokenizer.from_pretrained(demo_model_dir)


def fresh_model(model_dir: Path, tok: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)  # the new scalar head
    return load_reward_model(model_dir, CPU, False, pad_token_id(tok))


def judge(params: Params, **overrides: object) -> JudgeParams:
    return dataclasses.replace(params.judge, **overrides)


# --- bradley_terry_loss ---------------------------------------------------------------------


def test_bradley_terry_loss_by_hand() -> None:
    chosen = torch.tensor([3.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 0.5, 1.0])  # margins 2, 0, -2
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_loss_is_finite_for_huge_margins() -> None:
    zero = torch.zeros(1)
    assert bradley_terry_loss(torch.tensor([1000.0]), zero).item() == pytest.approx(0.0, abs=1e-30)
    assert bradley_terry_loss(torch.tensor([-1000.0]), zero).item() == pytest.approx(1000.0)
    chosen = torch.tensor([1000.0, -1000.0], requires_grad=True)
    bradley_terry_loss(chosen, torch.zeros(2)).backward()
    assert torch.isfinite(chosen.grad).all()
    assert chosen.grad.tolist() == pytest.approx([0.0, -0.5])


def test_bradley_terry_gradient_by_hand() -> None:
    chosen = torch.tensor([3.0, 0.5, -1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.5, 1.0, -0.5], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    margin = (chosen - rejected).detach()
    share = torch.sigmoid(-margin) / len(margin)
    torch.testing.assert_close(chosen.grad, -share, rtol=0, atol=1e-7)
    torch.testing.assert_close(rejected.grad, share, rtol=0, atol=1e-7)


# --- parity with TRL's RewardTrainer --------------------------------------------------------


def random_pairs(lengths: Sequence[tuple[int, int]], high: int, seed: int = 1) -> Pairs:
    """Token rows of the given lengths, ids below `high` (so never the pad id)."""
    gen = torch.Generator().manual_seed(seed)

    def row(n: int) -> list[int]:
        return torch.randint(0, high, (n,), generator=gen).tolist()

    return [(row(c), row(r)) for c, r in lengths]


def test_loss_and_gradients_equal_trl_reward_trainer(
    demo_model_dir: Path, tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    trl = pytest.importorskip("trl", minversion="1.16", reason="TRL is the parity reference")
    import datasets

    model = fresh_model(demo_model_dir, tok)
    theirs, mine = copy.deepcopy(model), copy.deepcopy(model)
    pairs = random_pairs([(5, 9), (12, 3), (7, 7), (1, 4)], high=pad_token_id(tok))
    examples = datasets.Dataset.from_dict(
        {"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]}
    )
    config = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,  # RewardConfig's default is bf16
        activation_checkpointing=False,  # its default is on
    )
    trainer = trl.RewardTrainer(
        model=theirs, args=config, train_dataset=examples, processing_class=tok
    )
    batch = trainer.data_collator([examples[i] for i in range(len(examples))])
    assert batch["input_ids"].shape == (2 * len(pairs), 12)  # right-padded to the longest row
    trainer.model.train()
    mine.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    ids = _padded([row for pair in pairs for row in pair], pad_token_id(tok), CPU.device)
    scores = rewards(mine, ids, CPU)
    loss = bradley_terry_loss(scores[0::2], scores[1::2])
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= 1e-6
    grads = dict(trainer.model.named_parameters())
    for name, param in mine.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=0, atol=1e-6, msg=name)


# --- scoring and pair accuracy --------------------------------------------------------------


def test_padded_by_hand() -> None:
    ids = _padded([[4, 5, 6], [7], [0, 8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[4, 5, 6], [7, 0, 0], [0, 8, 0]]


def test_pair_accuracy_counts_ties_as_half(monkeypatch: pytest.MonkeyPatch) -> None:
    def score_of_first_token(
        model: object, rows: Sequence[list[int]], batch_size: int, runtime: object, desc: str = ""
    ) -> np.ndarray:
        return np.array([float(row[0]) for row in rows])

    monkeypatch.setattr(reward_module, "score_rows", score_of_first_token)
    pairs = [([3], [1]), ([2], [2]), ([0], [4]), ([9], [8])]  # win, tie, loss, win
    assert pair_accuracy(None, pairs, 2, CPU) == 2.5 / 4
    assert pair_accuracy(None, [([5], [5])], 2, CPU) == 0.5
    assert pair_accuracy(None, [([1], [5]), ([5], [1])], 2, CPU) == 0.5


def test_a_zero_head_ties_every_pair(demo_model_dir: Path, tok: PreTrainedTokenizerBase) -> None:
    model = fresh_model(demo_model_dir, tok)
    with torch.no_grad():
        model.score.weight.zero_()
    pairs = random_pairs([(5, 9), (12, 3), (7, 7)], high=pad_token_id(tok))
    assert pair_accuracy(model, pairs, 2, CPU) == 0.5


def test_score_rows_keeps_the_rows_order(
    demo_model_dir: Path, tok: PreTrainedTokenizerBase
) -> None:
    model = fresh_model(demo_model_dir, tok).eval()
    rows = [
        row for pair in random_pairs([(9, 2), (4, 12), (6, 6)], pad_token_id(tok)) for row in pair
    ]
    batched = score_rows(model, rows, batch_size=4, runtime=CPU)
    with torch.no_grad():
        alone = [rewards(model, torch.tensor([row]), CPU).item() for row in rows]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    assert len(set(np.round(batched, 4))) == len(rows)  # distinct: a reordering would show


# --- training on the demo pairs -------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_pairs(
    demo_dataset_dir: Path, tok: PreTrainedTokenizerBase, repo_params: Params
) -> tuple[Pairs, Pairs]:
    """(train, held-out) pairs of the demo set, as the reward stage builds them, 192 tokens."""
    params = dataclasses.replace(repo_params, judge=judge(repo_params, max_length=192, model=""))
    form = reward_format(params, tok)
    held = read_pairs(demo_dataset_dir / "data" / "evaluation")
    train, _ = without_questions(read_pairs(demo_dataset_dir / "data" / "rl"), held)
    return pair_rows(train.slice(0, 256), tok, form), pair_rows(held.slice(0, 200), tok, form)


@pytest.mark.slow
def test_training_raises_held_out_accuracy(
    demo_model_dir: Path,
    tok: PreTrainedTokenizerBase,
    demo_pairs: tuple[Pairs, Pairs],
    repo_params: Params,
) -> None:
    train, held = demo_pairs
    assert len(train) > 200 and len(held) > 100
    model = fresh_model(demo_model_dir, tok)
    before = pair_accuracy(model, held, 32, CPU)
    params = judge(repo_params, lr=1e-3, epochs=1, batch_size=16, device="cpu", seed=0)
    history = train_reward_model(model, train, params, CPU)
    assert not model.training
    after = pair_accuracy(model, held, 32, CPU)
    assert [row["epoch"] for row in history] == [1]
    assert math.isfinite(history[0]["loss"]) and history[0]["loss"] < math.log(2)
    assert after >= 0.75 and after >= before + 0.2, (before, after)


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(
    demo_model_dir: Path,
    tok: PreTrainedTokenizerBase,
    demo_pairs: tuple[Pairs, Pairs],
    repo_params: Params,
) -> None:
    pairs = demo_pairs[0][:40]
    params = judge(repo_params, lr=1e-3, epochs=2, batch_size=16, device="cpu", seed=3)

    def trained(seed: int) -> dict[str, torch.Tensor]:
        model = fresh_model(demo_model_dir, tok)
        train_reward_model(model, pairs, dataclasses.replace(params, seed=seed), CPU)
        return model.state_dict()

    first, again, other = trained(3), trained(3), trained(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["score.weight"], other["score.weight"])  # the shuffle's seed


# --- input format ---------------------------------------------------------------------------


def ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_row_is_the_template_prompt_then_the_answer_and_one_eos(
    tok: PreTrainedTokenizerBase, repo_params: Params
) -> None:
    tokenize = dataclasses.replace(repo_params.tokenize, use_chat_template=False)
    form = RewardFormat(tokenize, max_length=512, chat=False)
    question, answer = "How do I sort a dict by value?", "Use `sorted(d.items())`."
    prompt = ids(tok, tokenize.template.replace("{question}", question))
    assert form.row(tok, question, answer) == prompt + ids(tok, answer) + [tok.eos_token_id]
    ended = form.row(tok, question, answer + tok.eos_token * 2)
    assert ended == prompt + ids(tok, answer) + [tok.eos_token_id]


def test_row_is_cut_at_max_length_after_a_bounded_prompt(
    tok: PreTrainedTokenizerBase, repo_params: Params
) -> None:
    tokenize = dataclasses.replace(repo_params.tokenize, use_chat_template=False)
    question, answer = "Why is my loop slow? " * 20, "Because it copies the list. " * 20
    full = RewardFormat(tokenize, max_length=4096, chat=False).row(tok, question, answer)
    cut = RewardFormat(tokenize, max_length=40, chat=False).row(tok, question, answer)
    assert len(full) > 40 and cut == full[:40] and tok.eos_token_id not in cut
    short = dataclasses.replace(tokenize, max_prompt_length=16)
    prompt, shortened = encode_prompt(tok, question, short)
    assert shortened and len(prompt) <= 16
    row = RewardFormat(short, max_length=40, chat=False).row(tok, question, answer)
    assert len(row) == 40 and row[: len(prompt)] == prompt
    assert row[len(prompt) :] == ids(tok, answer)[: 40 - len(prompt)]


def test_chat_row_is_a_user_and_an_assistant_turn(
    tok: PreTrainedTokenizerBase, repo_params: Params
) -> None:
    form = RewardFormat(repo_params.tokenize, max_length=512, chat=True)
    question, answer = "How do I sort a dict by value?", "Use `sorted(d.items())`."
    # The demo tokenizer's chat template (Qwen's), written out.
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    row = form.row(tok, question, answer)
    assert row == ids(tok, text)
    assert tok.decode(row) == text
    short = RewardFormat(repo_params.tokenize, max_length=12, chat=True)
    assert short.row(tok, question, answer) == row[:12]


def test_pair_rows_drops_pairs_identical_after_the_cut(
    tok: PreTrainedTokenizerBase, repo_params: Params
) -> None:
    form = RewardFormat(repo_params.tokenize, max_length=24, chat=False)
    rows = [
        {
            "question": "Q?",
            "response_j": "Same start " * 20 + "good",
            "response_k": "Same start " * 20,
        },
        {"question": "Q?", "response_j": "A fine answer.", "response_k": "No."},
    ]
    pairs = pair_rows(source_table(rows), tok, form)
    assert pairs == [(form.row(tok, "Q?", "A fine answer."), form.row(tok, "Q?", "No."))]


# --- held-out questions ---------------------------------------------------------------------


def source_table(rows: list[dict]) -> pa.Table:
    """PAIRS_SCHEMA rows of stack-exchange-paired rows; missing fields get placeholder values."""
    filled = [
        {
            "qid": 1,
            "question": "Q?",
            "date": "2020/01/01",
            "metadata": ["https://a.com/questions/1", "https://a.com/a/1", "https://a.com/a/2"],
            "response_j": "yes",
            "response_k": "no",
            **row,
        }
        for row in rows
    ]
    return pairs(pa.Table.from_pylist(filled, schema=SOURCE_SCHEMA))


def pair(url: str, qid: int, tag: str) -> dict:
    return {"qid": qid, "metadata": [url, f"{url}/a", f"{url}/b"], "response_j": tag}


def test_without_questions_removes_exactly_the_held_out_questions() -> None:
    a, b, c = (
        "https://so.com/questions/7",
        "https://su.com/questions/7",
        "https://so.com/questions/8",
    )
    table = source_table(
        [pair(a, 7, "a1"), pair(b, 7, "b1"), pair(c, 8, "c1"), pair(a, 7, "a2"), pair(c, 8, "c2")]
    )
    held = source_table([pair(a, 7, "held"), pair("https://so.com/questions/99", 99, "other")])
    kept, removed = without_questions(table, held)
    assert removed == 2
    assert kept["chosen"].to_pylist() == ["b1", "c1", "c2"]  # same qid, other site: kept
    assert kept.schema == PAIRS_SCHEMA
    assert without_questions(table, source_table([pair("https://x.com/q", 1, "x")]))[1] == 0


def test_without_a_reward_split_the_reward_model_gets_the_train_pairs_the_policy_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """judge.reward_dir "": a fetched train row's index is its pair_id; the policy's are removed."""
    from pipeline.judge.build import without_policy_pairs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/subsampled/train").mkdir(parents=True)
    pq.write_table(
        pa.table({"pair_id": pa.array([0, 2], pa.int64())}),
        tmp_path / "data/subsampled/train/data.parquet",
    )
    fetched = source_table([pair(f"https://so.com/questions/{i}", i, f"t{i}") for i in range(4)])
    assert without_policy_pairs(fetched)["chosen"].to_pylist() == ["t1", "t3"]


def test_a_non_finite_loss_stops_reward_training_naming_its_step(
    demo_model_dir: Path,
    tok: PreTrainedTokenizerBase,
    demo_pairs: tuple[Pairs, Pairs],
    repo_params: Params,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.judge import reward
    from pipeline.train.steps import NonFiniteLoss

    plain, calls = reward.bradley_terry_loss, []

    def nan_at_step_2(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = plain(chosen, rejected)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(reward, "bradley_terry_loss", nan_at_step_2)
    params = judge(repo_params, lr=1e-3, epochs=1, batch_size=8, device="cpu", seed=0)
    with pytest.raises(NonFiniteLoss, match="non-finite reward model loss at step 2"):
        train_reward_model(fresh_model(demo_model_dir, tok), demo_pairs[0][:32], params, CPU)
    assert len(calls) == 4  # the epoch's steps ran; the check reads their flags at its end
