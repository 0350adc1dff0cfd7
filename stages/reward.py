"""reward: models/base + judge.reward_dir's pairs (or judge.model) + data/subsampled/eval ->
models/reward (a sequence-classification model with one output, and its input format),
reports/reward.json (every figure) and metrics/reward.json (held-out pair accuracy with its 95 %
Wilson interval: the judge's figures are unreliable when its lower end is at or below 0.5)."""

from pipeline.data.schema import read_split
from pipeline.judge.build import adopt_reward, train_reward
from pipeline.judge.trust import COIN, reliable
from pipeline.model.loading import resolve_runtime
from pipeline.params import load_params, save_resolved
from pipeline.resources import stage_share
from pipeline.stage_io import (
    DATA_SUBSAMPLED,
    METRICS,
    MODEL_REWARD,
    REPORTS,
    atomic_dir,
    run_stage,
    write_json_atomic,
)

# metrics/reward.json: the accuracy and its interval (dvc exp show); the rest is in reports/.
HEADLINE = ("reward_accuracy", "reward_accuracy_low", "reward_accuracy_high")


def main() -> None:
    params = load_params()
    runtime = resolve_runtime(params.judge.device)
    held_out = read_split(DATA_SUBSAMPLED / "eval")
    build = adopt_reward if params.judge.model else train_reward
    with atomic_dir(MODEL_REWARD) as tmp, stage_share(params.judge.device):
        report = build(params, held_out, runtime, tmp)
        save_resolved(params, tmp, "reward")
    write_json_atomic(REPORTS / "reward.json", report)
    write_json_atomic(METRICS / "reward.json", {k: report[k] for k in HEADLINE})
    source = params.judge.model or f"{report['train_pairs']} pairs of {params.judge.reward_dir}"
    # Said here, before any policy is judged with it: the judge stage marks its figures too.
    warning = (
        ""
        if reliable(report["reward_accuracy_low"])
        else f"; lower end at or below {COIN}: the judge's figures will be marked unreliable"
    )
    print(
        f"reward model ({source}): held-out pair accuracy {report['reward_accuracy']:.4f} "
        f"[{report['reward_accuracy_low']:.4f}, {report['reward_accuracy_high']:.4f}] "
        f"on {report['heldout_pairs']} pairs{warning}"
    )


if __name__ == "__main__":
    run_stage(main)
