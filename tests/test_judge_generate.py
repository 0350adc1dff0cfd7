"""The judge's questions (a seeded choice of held-out questions and their best answers) and its
answers: left padding by hand, and generation with the tiny demo model (same seeds, same draws)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demo.dataset import SOURCE_SCHEMA
from pipeline.data.prompts import encode, encode_prompt
from pipeline.judge.generate import Answer, Question, _left_padded, generate, judge_questions
from pipeline.model.loading import freeze, load_causal_lm, pad_token_id
from pipeline.params import Params, load_params
from pipeline.strict_yaml import ParamsError
from tests.helpers import CPU, REPO, pairs, read_pairs

# One intra-op thread per test module (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 24


# --- judge_questions ------------------------------------------------------------------------


def row(url: str, qid: int, chosen: str, rejected: str) -> dict:
    return {
        "qid": qid,
        "question": f"question at {url}",
        "date": "2020/01/01",
        "metadata": [url, f"{url}/answer/{chosen}", f"{url}/answer/{rejected}"],
        "response_j": chosen,
        "response_k": rejected,
    }


# The split's order of questions is q5, q2, q9, so/7, su/7, q0, ... (first appearance), which is
# not the URLs' sorted order; so/7 and su/7 share a qid on two sites.
URLS = [
    "https://a.com/questions/5",
    "https://a.com/questions/2",
    "https://a.com/questions/9",
    "https://so.com/questions/7",
    "https://su.com/questions/7",
] + [f"https://b.com/questions/{i}" for i in range(7)]


@pytest.fixture(scope="module")
def held_out() -> pa.Table:
    q5, q2, q9, so7, su7, *rest = URLS
    rows = [
        row(q5, 5, "B", "C"),  # A beats B and C, B only C: A is q5's best though B comes first
        row(q2, 2, "X", "Y"),
        row(q5, 5, "A", "B"),
        row(q9, 9, "P", "Q"),
        row(so7, 7, "S", "T"),
        row(su7, 7, "U", "V"),
        row(q5, 5, "A", "C"),
        row(q9, 9, "R", "P"),
        row(q9, 9, "R", "Q"),  # R wins twice, P once
        *(row(url, 100 + i, f"good {i}", f"bad {i}") for i, url in enumerate(rest)),
    ]
    return pairs(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA))


def test_judge_questions_are_distinct_and_count_of_them(held_out: pa.Table) -> None:
    questions = judge_questions(held_out, 5, seed=0)
    assert len(questions) == 5 and len({q.url for q in questions}) == 5
    assert {q.url for q in questions} <= set(URLS)
    everything = judge_questions(held_out, 100, seed=0)
    assert [q.url for q in everything] == URLS  # all of them, in the split's order


def test_judge_questions_follow_the_split_order(held_out: pa.Table) -> None:
    for seed in range(5):
        picked = [URLS.index(q.url) for q in judge_questions(held_out, 4, seed)]
        assert picked == sorted(picked)


def test_judge_questions_are_a_seeded_choice(held_out: pa.Table) -> None:
    def urls(seed: int) -> list[str]:
        return [q.url for q in judge_questions(held_out, 4, seed)]

    assert urls(0) == urls(0)
    assert urls(0) != urls(1)


def test_judge_questions_best_answer_wins_most_pairs(held_out: pa.Table) -> None:
    by_url = {q.url: q for q in judge_questions(held_out, 100, seed=0)}
    q5, q2, q9, so7, su7 = URLS[:5]
    assert [by_url[u].best for u in (q5, q2, q9, so7, su7)] == ["A", "X", "R", "S", "U"]
    assert by_url[q5].text == f"question at {q5}"


# --- _left_padded ---------------------------------------------------------------------------


def test_left_padded_by_hand() -> None:
    ids, mask = _left_padded([[4, 5, 6], [7], [0, 8]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]  # a real token equal to pad counts


# --- generate -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo_params() -> Params:
    return load_params(REPO / "params.yaml")


def decoding(params: Params, **judge: object) -> Params:
    """params.yaml with small decoding settings: sampled, 24 new tokens, batches of 4."""
    small = {
        "max_new_tokens": MAX_NEW,
        "temperature": 0.7,
        "top_p": 0.95,
        "samples": 1,
        "generate_batch_size": 4,
        "seed": 0,
        **judge,
    }
    return dataclasses.replace(params, judge=dataclasses.replace(params.judge, **small))


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> PreTrainedModel:
    return freeze(load_causal_lm(demo_model_dir, CPU, False))


@pytest.fixture(scope="module")
def pad(demo_tokenizer: PreTrainedTokenizerBase) -> int:
    return pad_token_id(demo_tokenizer)


@pytest.fixture(scope="module")
def questions(demo_dataset_dir: Path) -> list[Question]:
    return judge_questions(read_pairs(demo_dataset_dir / "data" / "evaluation"), 8, seed=0)


@pytest.fixture(scope="module")
def prompts(
    questions: list[Question], demo_tokenizer: PreTrainedTokenizerBase, repo_params: Params
) -> list[list[int]]:
    """Eight held-out demo questions as the pipeline prompts them (different lengths)."""
    encoded = [encode_prompt(demo_tokenizer, q.text, repo_params.tokenize)[0] for q in questions]
    assert len({len(p) for p in encoded}) > 1
    return encoded


def ends_of(model: PreTrainedModel) -> set[int]:
    ends = model.generation_config.eos_token_id
    return {ends} if isinstance(ends, int) else set(ends)


@pytest.fixture(scope="module")
def finished(
    model: PreTrainedModel,
    questions: list[Question],
    prompts: list[list[int]],
    demo_tokenizer: PreTrainedTokenizerBase,
) -> list[int]:
    """A prompt followed by the dataset's best answer, the one the model most surely ends."""
    answered = [p + encode(demo_tokenizer, q.best) for p, q in zip(prompts, questions, strict=True)]
    ends = sorted(ends_of(model))
    with torch.no_grad():
        chance = [model(torch.tensor([p])).logits[0, -1].softmax(-1)[ends].sum() for p in answered]
    return answered[int(torch.stack(chance).argmax())]


def perturbed(model: PreTrainedModel, scale: float = 0.05) -> PreTrainedModel:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return other


def test_generate_repeats_itself_for_the_same_seeds(
    model: PreTrainedModel, prompts: list[list[int]], pad: int, repo_params: Params
) -> None:
    params = decoding(repo_params, samples=2)
    first = generate(model, prompts, params, pad, CPU, "test")
    assert len(first) == len(prompts) and all(len(answers) == 2 for answers in first)
    assert generate(model, prompts, params, pad, CPU, "test") == first
    assert (
        generate(model, prompts, decoding(repo_params, samples=2, seed=1), pad, CPU, "t") != first
    )


def test_generate_gives_samples_answers_per_prompt(
    model: PreTrainedModel,
    prompts: list[list[int]],
    finished: list[int],
    pad: int,
    repo_params: Params,
) -> None:
    """What sampling guarantees whatever the random stream (which answers end early is the
    stream's, and differs across CPUs): samples answers per prompt; an answer
    hits the limit exactly when it holds MAX_NEW tokens and no end marker; samples differ."""
    mixed = [finished, prompts[0], finished, prompts[1]]
    written = generate(model, mixed, decoding(repo_params, samples=3), pad, CPU, "test")
    assert [len(answers) for answers in written] == [3, 3, 3, 3]
    for answer in (a for answers in written for a in answers):
        assert not ends_of(model) & set(answer.tokens)
        assert answer.hit_max == (len(answer.tokens) == MAX_NEW)
    assert any(len({tuple(a.tokens) for a in answers}) > 1 for answers in written)


def test_answers_stop_at_an_end_token_or_hit_the_limit(
    model: PreTrainedModel, prompts: list[list[int]], pad: int, repo_params: Params
) -> None:
    greedy = decoding(repo_params, temperature=0.0)
    full = [answers[0].tokens for answers in generate(model, prompts, greedy, pad, CPU, "test")]
    # An end marker that some greedy answers write within the limit and others do not.
    end = next(t for t in full[0] if any(t not in other for other in full))
    stopping = copy.deepcopy(model)
    stopping.generation_config.eos_token_id = [end]
    cut = [answers[0] for answers in generate(stopping, prompts, greedy, pad, CPU, "test")]
    for answer, whole in zip(cut, full, strict=True):
        if end in whole:
            assert answer == Answer(whole[: whole.index(end)], hit_max=False)
        else:
            assert answer == Answer(whole, hit_max=True) and len(whole) == MAX_NEW
    assert {a.hit_max for a in cut} == {True, False}
    for answers in generate(model, prompts, decoding(repo_params), pad, CPU, "test"):
        for answer in answers:
            assert not ends_of(model) & set(answer.tokens)
            assert answer.hit_max == (len(answer.tokens) == MAX_NEW)


def test_greedy_answers_ignore_the_seed_and_the_batch(
    model: PreTrainedModel, prompts: list[list[int]], pad: int, repo_params: Params
) -> None:
    greedy = decoding(repo_params, temperature=0.0)
    batched = generate(model, prompts, greedy, pad, CPU, "test")
    assert (
        generate(model, prompts, decoding(repo_params, temperature=0.0, seed=7), pad, CPU, "t")
        == batched
    )
    alone = [generate(model, [p], greedy, pad, CPU, "test")[0] for p in prompts]
    assert alone == batched  # left padding changes nothing


def test_greedy_with_several_samples_is_refused_naming_both_keys(repo_params: Params) -> None:
    with pytest.raises(ParamsError, match="judge.samples: 2 with judge.temperature: 0"):
        decoding(repo_params, temperature=0.0, samples=2)


def test_sampling_applies_no_top_k(
    model: PreTrainedModel, prompts: list[list[int]], pad: int, repo_params: Params
) -> None:
    """Nearly flat sampling (temperature 50, top_p 1) draws first tokens far down the model's
    ranking; a hidden top-k of 50 would keep every draw among the model's 50 likeliest."""
    flat = decoding(repo_params, temperature=50.0, top_p=1.0, samples=4, max_new_tokens=1)
    written = generate(model, prompts, flat, pad, CPU, "test")
    with torch.no_grad():
        top = [model(torch.tensor([p])).logits[0, -1].topk(50).indices.tolist() for p in prompts]
    drawn = [(a.tokens or [None])[0] for answers in written for a in answers]
    allowed = [set(t) for t in top for _ in range(4)]
    assert any(token not in ok for token, ok in zip(drawn, allowed, strict=True))


def test_equal_weights_draw_equal_answers_and_other_weights_other_ones(
    model: PreTrainedModel, prompts: list[list[int]], pad: int, repo_params: Params
) -> None:
    params = decoding(repo_params, samples=2)
    mine = generate(model, prompts, params, pad, CPU, "test")
    assert generate(copy.deepcopy(model), prompts, params, pad, CPU, "test")[0] == mine[0]
    assert generate(perturbed(model), prompts, params, pad, CPU, "test")[0] != mine[0]


def test_each_batch_draws_from_its_own_seed(
    model: PreTrainedModel,
    prompts: list[list[int]],
    finished: list[int],
    pad: int,
    repo_params: Params,
) -> None:
    """The second batch is answered the same after a first batch that stopped at once (fewer
    random draws) as after one that ran to the limit."""
    params = decoding(repo_params)
    after_quick = generate(model, [finished] * 4 + prompts[4:], params, pad, CPU, "test")
    after_long = generate(model, prompts, params, pad, CPU, "test")
    assert all(len(a[0].tokens) < MAX_NEW // 2 for a in after_quick[:4])
    assert all(a[0].hit_max for a in after_long[:4])
    assert after_quick[4:] == after_long[4:]
