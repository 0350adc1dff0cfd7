"""reward: models/base + judge.reward_dir's pairs (or judge.model) + data/subsampled/eval ->
models/reward (a sequence-classification model with one output, and its input format),
reports/reward.json (every figure) and metrics/reward.json (held-out pair accuracy with its 95 %
Wilson interval: the judge's figures are unreliable when its lower end is at or below 0.5)."""

from pipeline.data.schema import read_split
from pipeline.judge.build import HEADLINE, build_reward, reward_line
from pipeline.params import load_params, save_resolved
from pipeline.resources import on_device
from pipeline.stage_io import (
    DATA_SUBSAMPLED,
    METRICS,
    MODEL_REWARD,
    REPORTS,
    atomic_dir,
    run_stage,
    write_json_atomic,
)


def main() -> None:
    params = load_params()
    held_out = read_split(DATA_SUBSAMPLED / "eval")
    with atomic_dir(MODEL_REWARD) as tmp, on_device(params.judge.device) as runtime:
        report = build_reward(params, held_out, runtime, tmp)
        save_resolved(params, tmp, "reward")
    write_json_atomic(REPORTS / "reward.json", report)
    write_json_atomic(METRICS / "reward.json", {k: report[k] for k in HEADLINE})
    print(reward_line(params, report))


if __name__ == "__main__":
    run_stage(main)
