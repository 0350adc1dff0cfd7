"""base_answers: models/base + models/reward + data/subsampled/eval -> data/judge_base/ (the base
model's answers to the judge's held-out questions and the dataset's best answers, each scored by
the reward model). Its own stage, so an experiment that only changes train.* reuses it."""

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.schema import read_split
from pipeline.judge.generate import (
    ANSWERS_FILE,
    human_answers,
    judge_questions,
    model_answers,
    scored,
)
from pipeline.model.loading import resolve_runtime
from pipeline.params import load_params, save_resolved
from pipeline.resources import stage_share
from pipeline.stage_io import DATA_JUDGE_BASE, DATA_SUBSAMPLED, MODEL_BASE, atomic_dir, run_stage


def main() -> None:
    params = load_params()
    runtime = resolve_runtime(params.judge.device)
    judge = params.judge
    questions = judge_questions(read_split(DATA_SUBSAMPLED / "eval"), judge.prompts, judge.seed)
    with stage_share(judge.device):
        answers = model_answers(MODEL_BASE, "base", questions, params, runtime)
        humans = human_answers(MODEL_BASE, questions, params)
        table = scored(pa.concat_tables([answers, humans]), params, runtime)
    with atomic_dir(DATA_JUDGE_BASE) as tmp:
        pq.write_table(table, tmp / ANSWERS_FILE)
        save_resolved(params, tmp, "base_answers")
    rewards = table.filter(pc.equal(table["source"], "base"))["reward"]
    print(
        f"base model: {len(answers)} answers to {len(questions)} held-out questions, "
        f"mean reward {pc.mean(rewards).as_py():.3f}"
    )


if __name__ == "__main__":
    run_stage(main)
