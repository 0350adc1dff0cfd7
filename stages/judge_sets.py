"""judge_sets: models/policy + models/base + models/reward + data/eval_sets -> the judge's figures
on each extra held-out set with `judge` prompts (eval.datasets): metrics/judge_sets.json
(headline figures per set), reports/judge_sets.json (every figure), and `judge_<name>/` metrics
in the policy's MLflow run. The base model answers those prompts here too, with the main judge's
decoding and seeds: a stage of its own, so the main judge's answers and its champion key stay
as they are whatever the extra sets."""

import json

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.judge.generate import human_answers, judge_questions, model_answers, scored
from pipeline.judge.trust import judge_trust
from pipeline.judge.verdict import HEADLINE, figures_of, same_answer_same_reward
from pipeline.model.loading import Runtime, resolve_runtime
from pipeline.params import EvalSetParams, Params, load_params
from pipeline.resources import stage_share
from pipeline.stage_io import (
    DATA_EVAL_SETS,
    EVAL_SET_PAIRS,
    METRICS,
    MODEL_BASE,
    MODEL_POLICY,
    REPORTS,
    run_stage,
    write_json_atomic,
)
from pipeline.track import runs


def judge_set(spec: EvalSetParams, params: Params, runtime: Runtime) -> dict:
    """The judge's figures on `spec.judge` held-out prompts of one extra set."""
    held_out = pq.read_table(DATA_EVAL_SETS / spec.name / EVAL_SET_PAIRS)
    questions = judge_questions(held_out, spec.judge, params.judge.seed)
    base = model_answers(MODEL_BASE, "base", questions, params, runtime)
    humans = human_answers(MODEL_BASE, questions, params)
    base = scored(pa.concat_tables([base, humans]), params, runtime)
    policy = model_answers(MODEL_POLICY, "policy", questions, params, runtime)
    policy = same_answer_same_reward(scored(policy, params, runtime), base)
    return figures_of(policy, base, params.judge.seed)


def main() -> None:
    params = load_params()
    runtime = resolve_runtime(params.judge.device)
    judged = [spec for spec in params.eval.datasets if spec.judge]
    trust = judge_trust(json.loads((REPORTS / "reward.json").read_text())) if judged else {}
    figures = {}
    with stage_share(params.judge.device):
        for spec in judged:
            figures[spec.name] = {**judge_set(spec, params, runtime), **trust}
    write_json_atomic(REPORTS / "judge_sets.json", figures)
    headlines = {name: {k: f[k] for k in HEADLINE} for name, f in figures.items()}
    write_json_atomic(METRICS / "judge_sets.json", headlines)
    if figures:
        runs.configure()
        with mlflow.start_run(run_id=runs.read_run_id(MODEL_POLICY)):
            for name, values in figures.items():
                runs.log_flat_metrics(values, f"judge_{name}/")
    for name, f in figures.items():
        print(
            f"{name}: gen_win_rate {f['gen_win_rate']:.3f} [{f['gen_win_rate_low']:.3f}, "
            f"{f['gen_win_rate_high']:.3f}] over {f['prompts']} questions"
        )


if __name__ == "__main__":
    run_stage(main)
