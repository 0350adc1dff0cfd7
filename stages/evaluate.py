"""evaluate: models/base + models/policy + data/tokenized/eval + data/eval_sets ->
metrics/eval.json (headline figures, each extra held-out set's under sets.<name>),
reports/eval.json (every figure, the reference's, and the key that says which held-out pairs and
scoring they come from), reports/eval_extra.json (every figure of each extra set),
plots/eval_margins.csv (reward-margin histogram)."""

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
        sets = {
            spec.name: score_heldout(
                stage_io.MODEL_POLICY, params, runtime, spec.name, *stage_io.eval_set(spec.name)
            )[0]
            for spec in params.eval.datasets
        }
    # The register stage compares versions only on equal keys (or re-scores the champion).
    report = {**json_safe(metrics), "comparison_key": comparison_key(params, runtime)}
    headlines = json_safe(headline(metrics))
    if sets:
        headlines["sets"] = {name: json_safe(headline(m)) for name, m in sets.items()}
    stage_io.write_json_atomic(stage_io.REPORTS / "eval.json", report)
    # Apart from reports/eval.json, which the register stage reads: another extra set is no
    # reason to register the same policy again.
    extra = {name: json_safe(m) for name, m in sets.items()}
    stage_io.write_json_atomic(stage_io.REPORTS / "eval_extra.json", extra)
    stage_io.write_json_atomic(stage_io.METRICS / "eval.json", headlines)
    runs.configure()
    with mlflow.start_run(run_id=runs.read_run_id(stage_io.MODEL_POLICY)):
        runs.log_split(EVAL_SPLIT, params, "evaluation")
        runs.log_flat_metrics({k: v for k, v in metrics.items() if k != "reference"}, "eval/")
        runs.log_flat_metrics(metrics["reference"], "eval_reference/")
        for spec in params.eval.datasets:
            origin = (spec.dataset, spec.revision, spec.split)
            tokenized = stage_io.eval_set(spec.name)[0]
            runs.log_split(tokenized, params, f"evaluation/{spec.name}", origin)
            figures = sets[spec.name]
            rest = {k: v for k, v in figures.items() if k != "reference"}
            runs.log_flat_metrics(rest, f"eval_{spec.name}/")
            runs.log_flat_metrics(figures["reference"], f"eval_{spec.name}_reference/")
    stage_io.write_csv_atomic(
        stage_io.PLOTS / "eval_margins.csv", margin_histogram(scored), ("margin", "pairs")
    )
    for name, figures in {"held-out": metrics, **sets}.items():
        print(
            f"{name}: win_rate {figures['win_rate']:.4f} (reference "
            f"{figures['reference']['win_rate']:.4f}), kendall_tau {figures['kendall_tau']:.4f} "
            f"over {figures['kendall_questions']} questions, {figures['pairs']} pairs"
        )


if __name__ == "__main__":
    run_stage(main)
