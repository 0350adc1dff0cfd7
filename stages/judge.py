"""judge: models/policy + models/reward + data/judge_base -> reports/judge.json (every figure:
generation win rate against the base model with its interval, length-controlled win rate,
rewards, lengths, answers cut at the limit, loops, and the reward model's held-out accuracy with
its interval), metrics/judge.json (headline figures, and `judge_reliable`: false when the reward
model cannot be told from a coin), reports/judge_samples.json (each question's answers side by
side), and all of it in the policy's MLflow run."""

import json
from typing import Any

import pyarrow.parquet as pq

from pipeline.fingerprint import fingerprint
from pipeline.judge.generate import ANSWERS_FILE, model_answers, scored
from pipeline.judge.trust import judge_trust, reward_model_phrase, unreliable_reason
from pipeline.judge.verdict import (
    HEADLINE,
    figures_of,
    log_to_run,
    questions_of,
    same_answer_same_reward,
    side_by_side,
)
from pipeline.model.loading import resolve_runtime
from pipeline.params import load_params
from pipeline.resources import stage_share
from pipeline.stage_io import (
    DATA_JUDGE_BASE,
    METRICS,
    MODEL_POLICY,
    REPORTS,
    run_stage,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.track import runs


def main() -> None:
    params = load_params()
    runtime = resolve_runtime(params.judge.device)
    base = pq.read_table(DATA_JUDGE_BASE / ANSWERS_FILE)
    questions = questions_of(base)
    # Read first: a reward report without the accuracy's interval stops the stage before it
    # spends minutes generating.
    trust = judge_trust(json.loads((REPORTS / "reward.json").read_text()))
    with stage_share(params.judge.device):
        answers = model_answers(MODEL_POLICY, "policy", questions, params, runtime)
        policy = same_answer_same_reward(scored(answers, params, runtime), base)
    figures = {**figures_of(policy, base, params.judge.seed), **trust}
    # What the figures were measured on (questions, base answers, decoding, reward model): the
    # champion gate compares gen_win_rate only between versions with the same key.
    key = fingerprint({}, DATA_JUDGE_BASE)
    samples = side_by_side(policy, base)
    write_json_atomic(REPORTS / "judge.json", {**figures, "judge_key": key})
    write_json_atomic(METRICS / "judge.json", {k: figures[k] for k in HEADLINE})
    write_text_atomic(REPORTS / "judge_samples.json", samples.to_json(orient="records", indent=1))
    runs.configure()
    log_to_run(runs.read_run_id(MODEL_POLICY), figures, samples)
    print(verdict_line(figures))


def verdict_line(figures: dict[str, Any]) -> str:
    """The stage's one line: the win rate with its interval, and the reward model it rests on;
    a judge that cannot be told from a coin says so, with why."""
    line = (
        f"gen_win_rate {figures['gen_win_rate']:.3f} [{figures['gen_win_rate_low']:.3f}, "
        f"{figures['gen_win_rate_high']:.3f}] against the base model over "
        f"{figures['prompts']} questions x {figures['samples']} (length-controlled "
        f"{figures['gen_win_rate_lc']:.3f}"
    )
    reason = unreliable_reason(figures)  # it names the reward model's figures itself
    return f"{line}; {reward_model_phrase(figures)})" if reason is None else f"{line}); {reason}"


if __name__ == "__main__":
    run_stage(main)
