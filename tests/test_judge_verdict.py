"""The judge's verdict from scored answer tables: identical answers tie, figures and samples
line up by question and sample."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.judge.generate import ANSWERS_SCHEMA
from pipeline.judge.verdict import figures_of, questions_of, same_answer_same_reward, side_by_side


def rows(source: str, answers: list[list[str]], rewards: list[list[float]]) -> list[dict]:
    """One row per (prompt, sample) of `source`, listed sample-major to check the sorting."""
    return [
        {
            "source": source,
            "prompt": p,
            "sample": s,
            "url": f"u{p}",
            "question": f"q{p}",
            "answer": answers[p][s],
            "tokens": len(answers[p][s]),
            "hit_max": False,
            "loop": False,
            "reward": rewards[p][s],
        }
        for s in range(len(answers[0]))
        for p in range(len(answers))
    ]


def tables() -> tuple[pa.Table, pa.Table]:
    base = rows("base", [["a", "b"], ["c", "d"]], [[1.0, 2.0], [3.0, 4.0]])
    human = rows("human", [["best0"], ["best1"]], [[9.0], [8.0]])
    # Prompt 0 sample 0: the same answer as the base, scored a hair higher in another batch.
    policy = rows("policy", [["a", "bb"], ["cc", "d"]], [[1.0 + 1e-7, 1.0], [5.0, 4.0]])
    schema = ANSWERS_SCHEMA
    return (pa.Table.from_pylist(policy, schema), pa.Table.from_pylist(base + human, schema))


def test_the_same_answer_is_a_tie_whatever_the_float_noise() -> None:
    policy, base = tables()
    judged = same_answer_same_reward(policy, base)
    assert judged["reward"].to_pylist() == [1.0, 1.0, 5.0, 4.0]  # by prompt, then sample
    # Wins: tie, loss (1 < 2), win (5 > 3), tie (same answer "d", same reward): 2 / 4.
    assert figures_of(judged, base, seed=0)["gen_win_rate"] == pytest.approx(0.5)
    assert figures_of(policy, base, seed=0)["gen_win_rate"] == pytest.approx(0.625)  # noise won


def test_samples_line_up_by_question_and_sample_with_the_best_answer() -> None:
    policy, base = tables()
    frame = side_by_side(same_answer_same_reward(policy, base), base)
    assert list(frame["question"]) == ["q0", "q0", "q1", "q1"]
    assert list(frame["base_answer"]) == ["a", "b", "c", "d"]
    assert list(frame["policy_answer"]) == ["a", "bb", "cc", "d"]
    assert list(frame["winner"]) == ["tie", "base", "policy", "tie"]
    assert list(frame["human_answer"]) == ["best0", "best0", "best1", "best1"]
    assert [q.best for q in questions_of(base)] == ["best0", "best1"]
