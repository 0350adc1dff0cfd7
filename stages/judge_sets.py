"""judge_sets: models/policy + models/base + models/reward + data/eval_sets -> the judge's figures
on each extra held-out set with `judge` prompts (eval.datasets): metrics/judge_sets.json
(headline figures per set), reports/judge_sets.json (every figure), and `judge_<name>/` metrics
in the policy's MLflow run. A stage of its own, so the main judge's answers and its champion key
stay as they are whatever the extra sets."""

import mlflow

from pipeline.judge.verdict import HEADLINE, judge_set, reward_trust
from pipeline.params import load_params
from pipeline.resources import on_device
from pipeline.stage_io import METRICS, MODEL_POLICY, REPORTS, run_stage, write_json_atomic
from pipeline.track import runs


def main() -> None:
    params = load_params()
    judged = [spec for spec in params.eval.datasets if spec.judge]
    trust = reward_trust() if judged else {}
    figures = {}
    with on_device(params.judge.device) as runtime:
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
