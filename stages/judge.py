"""judge: models/policy + models/reward + data/judge_base -> reports/judge.json (every figure:
generation win rate against the base model with its interval, length-controlled win rate,
rewards, lengths, answers cut at the limit, loops, and the reward model's held-out accuracy with
its interval), metrics/judge.json (headline figures, and `judge_reliable`: false when the reward
model cannot be told from a coin), reports/judge_samples.json (each question's answers side by
side), and all of it in the policy's MLflow run."""

from pipeline.judge.verdict import (
    base_answers,
    figures_of,
    judged_answers,
    log_to_run,
    questions_of,
    reward_trust,
    side_by_side,
    verdict_line,
    write_verdict,
)
from pipeline.params import load_params
from pipeline.resources import on_device
from pipeline.stage_io import MODEL_POLICY, run_stage
from pipeline.track import runs


def main() -> None:
    params = load_params()
    base, trust = base_answers(), reward_trust()
    with on_device(params.judge.device) as runtime:
        policy = judged_answers(MODEL_POLICY, questions_of(base), base, params, runtime)
    figures = {**figures_of(policy, base, params.judge.seed), **trust}
    samples = side_by_side(policy, base)
    write_verdict(figures, samples)
    runs.configure()
    log_to_run(runs.read_run_id(MODEL_POLICY), figures, samples)
    print(verdict_line(figures))


if __name__ == "__main__":
    run_stage(main)
