"""base_answers: models/base + models/reward + data/subsampled/eval -> data/judge_base/ (the base
model's answers to the judge's held-out questions and the dataset's best answers, each scored by
the reward model). Its own stage, so an experiment that only changes train.* reuses it."""

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.schema import read_split
from pipeline.judge.generate import ANSWERS_FILE, base_side, judge_questions
from pipeline.params import load_params, save_resolved
from pipeline.resources import on_device
from pipeline.stage_io import DATA_JUDGE_BASE, DATA_SUBSAMPLED, atomic_dir, run_stage


def main() -> None:
    params = load_params()
    judge = params.judge
    questions = judge_questions(read_split(DATA_SUBSAMPLED / "eval"), judge.prompts, judge.seed)
    with on_device(judge.device) as runtime:
        table = base_side(questions, params, runtime)
    with atomic_dir(DATA_JUDGE_BASE) as tmp:
        pq.write_table(table, tmp / ANSWERS_FILE)
        save_resolved(params, tmp, "base_answers")
    rewards = table.filter(pc.equal(table["source"], "base"))["reward"]
    print(
        f"base model: {len(rewards)} answers to {len(questions)} held-out questions, "
        f"mean reward {pc.mean(rewards).as_py():.3f}"
    )


if __name__ == "__main__":
    run_stage(main)
