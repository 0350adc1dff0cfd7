"""The judge's verdict: the policy's scored answers against the base model's, as figures, as
side-by-side samples, and in the policy's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.fingerprint import fingerprint
from pipeline.judge.generate import (
    ANSWERS_FILE,
    Question,
    base_side,
    judge_questions,
    model_answers,
    scored,
)
from pipeline.judge.statistics import Answers, judge_figures
from pipeline.judge.trust import judge_trust, reward_model_phrase, unreliable_reason
from pipeline.model.loading import Runtime
from pipeline.params import EvalSetParams, Params
from pipeline.stage_io import (
    DATA_EVAL_SETS,
    DATA_JUDGE_BASE,
    EVAL_SET_PAIRS,
    METRICS,
    MODEL_POLICY,
    REPORTS,
    write_json_atomic,
    write_text_atomic,
)

SAMPLES_FILE = "judge_samples.json"  # the MLflow table, in the run's artifacts
# The figures dvc exp show lists (the reward model's accuracy and its interval are in
# metrics/reward.json: one column each, not two that DVC would have to tell apart; whether they
# make the judge reliable is here); reports/judge.json and MLflow hold all.
HEADLINE = (
    "gen_win_rate",
    "gen_win_rate_low",
    "gen_win_rate_high",
    "gen_win_rate_lc",
    "reward_policy",
    "reward_base",
    "length_policy",
    "length_base",
    "loop_share_policy",
    "judge_reliable",
)


def source(table: pa.Table, name: str) -> pa.Table:
    """The rows of one source (base, policy, human), by prompt then sample."""
    rows = table.filter(pc.equal(table["source"], name))
    return rows.sort_by([("prompt", "ascending"), ("sample", "ascending")])


def questions_of(base: pa.Table) -> list[Question]:
    """The judge's questions, in prompt order, from the base stage's human rows."""
    humans = source(base, "human").to_pydict()
    columns = (humans[c] for c in ("url", "question", "answer", "context"))
    return [Question(u, q, a, tuple(c or ())) for u, q, a, c in zip(*columns, strict=True)]


def same_answer_same_reward(policy: pa.Table, base: pa.Table) -> pa.Table:
    """The policy's rows with the base's reward wherever the policy wrote the base's answer.

    The same text scored in another batch can differ in the last float bits (other batch shapes,
    other summation order), and such noise would otherwise decide a win: an identical answer is a
    tie by definition."""
    mine, theirs = source(policy, "policy"), source(base, "base")
    same = np.array(mine["answer"].to_pylist(), dtype=object) == np.array(
        theirs["answer"].to_pylist(), dtype=object
    )
    rewards = np.where(same, theirs["reward"].to_numpy(), mine["reward"].to_numpy())
    return mine.set_column(mine.schema.get_field_index("reward"), "reward", pa.array(rewards))


def _grid(table: pa.Table, column: str) -> np.ndarray:
    """(P, S) values of one source's column."""
    prompts = len(pc.unique(table["prompt"]))
    return table[column].to_numpy(zero_copy_only=False).astype(np.float64).reshape(prompts, -1)


def figures_of(policy: pa.Table, base: pa.Table, seed: int) -> dict[str, float]:
    """Every judge figure (pipeline/judge/statistics.py) of the policy's rows against the base's."""
    base_rows, humans = source(base, "base"), source(base, "human")
    return judge_figures(
        _answers(policy),
        _answers(base_rows),
        _grid(humans, "reward")[:, 0],
        _grid(humans, "tokens")[:, 0],
        seed=seed,
    )


def _answers(table: pa.Table) -> Answers:
    return Answers(*(_grid(table, c) for c in ("reward", "tokens", "hit_max", "loop")))


def side_by_side(policy: pa.Table, base: pa.Table) -> pd.DataFrame:
    """One row per (question, sample): the question, both models' answers and rewards, who won,
    and the dataset's best answer with its reward."""
    mine, theirs = source(policy, "policy").to_pandas(), source(base, "base").to_pandas()
    humans = source(base, "human").to_pandas().set_index("prompt")
    margin = mine["reward"].to_numpy() - theirs["reward"].to_numpy()
    return pd.DataFrame(
        {
            "question": mine["question"],
            "sample": mine["sample"],
            "base_answer": theirs["answer"],
            "policy_answer": mine["answer"],
            "base_reward": theirs["reward"].round(4),
            "policy_reward": mine["reward"].round(4),
            "winner": np.where(margin > 0, "policy", np.where(margin < 0, "base", "tie")),
            "human_answer": humans.loc[mine["prompt"], "answer"].to_numpy(),
            "human_reward": humans.loc[mine["prompt"], "reward"].round(4).to_numpy(),
        }
    )


def log_to_run(run_id: str, figures: dict[str, Any], samples: pd.DataFrame) -> None:
    """The figures as `judge/*` metrics and the samples as an MLflow table of the policy's run
    (the run's Artifacts tab shows it; the runs list's "Artifact evaluation" view lines up
    several runs' tables by question). `judge_reliable` is also a run tag ("true"/"false", as
    train's `diverged`), so the runs list can filter out runs judged by a coin."""
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"judge/{k}": float(v) for k, v in figures.items()})
        if "judge_reliable" in figures:
            mlflow.set_tag("judge_reliable", str(bool(figures["judge_reliable"])).lower())
        mlflow.log_table(samples, artifact_file=SAMPLES_FILE)


def base_answers() -> pa.Table:
    """The base_answers stage's scored answers (data/judge_base)."""
    return pq.read_table(DATA_JUDGE_BASE / ANSWERS_FILE)


def reward_trust() -> dict[str, Any]:
    """`judge_trust` of the reward stage's report (reports/reward.json). Read before generating:
    a report without the accuracy's interval stops a stage before it spends minutes."""
    return judge_trust(json.loads((REPORTS / "reward.json").read_text()))


def judged_answers(
    policy_dir: Path, questions: list[Question], base: pa.Table, params: Params, runtime: Runtime
) -> pa.Table:
    """The answers of the policy in `policy_dir` to `questions`, scored, an answer equal to
    the base's taking the base's reward."""
    answers = model_answers(policy_dir, "policy", questions, params, runtime)
    return same_answer_same_reward(scored(answers, params, runtime), base)


def judge_set(spec: EvalSetParams, params: Params, runtime: Runtime) -> dict[str, Any]:
    """The judge's figures on `spec.judge` held-out prompts of one extra set (judge_sets stage):
    the base model answers them here too, with the main judge's decoding and seeds."""
    held_out = pq.read_table(DATA_EVAL_SETS / spec.name / EVAL_SET_PAIRS)
    questions = judge_questions(held_out, spec.judge, params.judge.seed)
    base = base_side(questions, params, runtime)
    policy = judged_answers(MODEL_POLICY, questions, base, params, runtime)
    return figures_of(policy, base, params.judge.seed)


def write_verdict(figures: dict[str, Any], samples: pd.DataFrame) -> None:
    """reports/judge.json (every figure, and the key of what they were measured on: questions,
    base answers, decoding, reward model; the champion gate compares gen_win_rate only between
    versions with the same key), metrics/judge.json (HEADLINE) and reports/judge_samples.json."""
    key = fingerprint({}, DATA_JUDGE_BASE)
    write_json_atomic(REPORTS / "judge.json", {**figures, "judge_key": key})
    write_json_atomic(METRICS / "judge.json", {k: figures[k] for k in HEADLINE})
    write_text_atomic(REPORTS / SAMPLES_FILE, samples.to_json(orient="records", indent=1))


def verdict_line(figures: dict[str, Any]) -> str:
    """The judge stage's one line: the win rate with its interval, and the reward model it rests
    on; a judge that cannot be told from a coin says so, with why."""
    line = (
        f"gen_win_rate {figures['gen_win_rate']:.3f} [{figures['gen_win_rate_low']:.3f}, "
        f"{figures['gen_win_rate_high']:.3f}] against the base model over "
        f"{figures['prompts']} questions x {figures['samples']} (length-controlled "
        f"{figures['gen_win_rate_lc']:.3f}"
    )
    reason = unreliable_reason(figures)  # it names the reward model's figures itself
    return f"{line}; {reward_model_phrase(figures)})" if reason is None else f"{line}); {reason}"
