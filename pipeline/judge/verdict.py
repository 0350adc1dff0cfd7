"""The judge's verdict: the policy's scored answers against the base model's, as figures, as
side-by-side samples, and in the policy's MLflow run."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.judge.figures import Answers, judge_figures
from pipeline.judge.generate import Question

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
    """Every judge figure (pipeline/judge/figures.py) of the policy's rows against the base's."""
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
