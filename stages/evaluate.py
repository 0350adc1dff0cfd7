"""evaluate: models/base + models/policy + data/tokenized/eval -> metrics/eval.json (headline
figures), reports/eval.json (every figure, the reference's, and the key that says which held-out
pairs and scoring they come from), plots/eval_margins.csv (reward-margin histogram)."""

import mlflow

from pipeline import stage_io
from pipeline.evaluate.heldout import EVAL_SPLIT, comparison_key, score_heldout
from pipeline.evaluate.metrics import headline, json_safe, margin_histogram
from pipeline.model.loading import resolve_runtime
from pipeline.params import load_params
from pipeline.resources import stage_share
from pipeline.stage_io import run_stage
from pipeline.track import runs


def main() -> None:
    params = load_params()
    runtime = resolve_runtime(params.eval.device)
    with stage_share(params.eval.device):
        metrics, scored = score_heldout(stage_io.MODEL_POLICY, params, runtime)
    # The register stage compares versions only on equal keys (or re-scores the champion).
    report = {**json_safe(metrics), "comparison_key": comparison_key(params, runtime)}
    stage_io.write_json_atomic(stage_io.REPORTS / "eval.json", report)
    stage_io.write_json_atomic(stage_io.METRICS / "eval.json", json_safe(headline(metrics)))
    runs.configure()
    with mlflow.start_run(run_id=runs.read_run_id(stage_io.MODEL_POLICY)):
        runs.log_split(EVAL_SPLIT, params, "evaluation")
        runs.log_flat_metrics({k: v for k, v in metrics.items() if k != "reference"}, "eval/")
        runs.log_flat_metrics(metrics["reference"], "eval_reference/")
    stage_io.write_csv_atomic(
        stage_io.PLOTS / "eval_margins.csv", margin_histogram(scored), ("margin", "pairs")
    )
    print(
        f"win_rate {metrics['win_rate']:.4f} (reference {metrics['reference']['win_rate']:.4f}), "
        f"kendall_tau {metrics['kendall_tau']:.4f} over {metrics['kendall_questions']} questions"
    )


if __name__ == "__main__":
    run_stage(main)
