"""The evaluate stage's library: a trained policy scored on the held-out split and on each extra
held-out set (eval.datasets), its figures written to reports/ and metrics/ and logged to its
MLflow run. Apart from `heldout`, which the register stage also uses: only the evaluate stage
reads eval.datasets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlflow

from pipeline.evaluate.heldout import EVAL_SPLIT, score_heldout
from pipeline.evaluate.metrics import headline, json_safe, margin_histogram
from pipeline.model.loading import Runtime
from pipeline.objective.losses import LossOutput
from pipeline.params import Params
from pipeline.stage_io import METRICS, PLOTS, REPORTS, eval_set, write_csv_atomic, write_json_atomic
from pipeline.track import runs


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A policy's figures on the held-out split (`metrics`, per pair in `scored`) and on each
    extra held-out set of eval.datasets (`sets`, by name)."""

    metrics: dict[str, Any]
    scored: LossOutput
    sets: dict[str, dict[str, Any]]

    def lines(self) -> list[str]:
        """One line per set: what the evaluate stage prints."""
        return [
            f"{name}: win_rate {f['win_rate']:.4f} (reference {f['reference']['win_rate']:.4f}), "
            f"kendall_tau {f['kendall_tau']:.4f} over {f['kendall_questions']} questions, "
            f"{f['pairs']} pairs"
            for name, f in {"held-out": self.metrics, **self.sets}.items()
        ]


def evaluate(policy_dir: Path, params: Params, runtime: Runtime) -> Evaluation:
    """The policy in `policy_dir` scored on the held-out split and on every extra set."""
    metrics, scored = score_heldout(policy_dir, params, runtime)
    sets = {
        spec.name: score_heldout(policy_dir, params, runtime, spec.name, *eval_set(spec.name))[0]
        for spec in params.eval.datasets
    }
    return Evaluation(metrics, scored, sets)


def write_reports(evaluation: Evaluation, key: dict[str, str]) -> None:
    """reports/eval.json (every held-out figure and its comparison key: the register stage
    compares versions only on equal keys), reports/eval_extra.json (every figure of each extra
    set: apart, so another extra set is no reason to register the same policy again),
    metrics/eval.json (the headline figures, each extra set's under sets.<name>) and
    plots/eval_margins.csv (the held-out reward margins' histogram)."""
    headlines = json_safe(headline(evaluation.metrics))
    if evaluation.sets:
        headlines["sets"] = {n: json_safe(headline(m)) for n, m in evaluation.sets.items()}
    report = {**json_safe(evaluation.metrics), "comparison_key": key}
    write_json_atomic(REPORTS / "eval.json", report)
    extra = {name: json_safe(m) for name, m in evaluation.sets.items()}
    write_json_atomic(REPORTS / "eval_extra.json", extra)
    write_json_atomic(METRICS / "eval.json", headlines)
    histogram = margin_histogram(evaluation.scored)
    write_csv_atomic(PLOTS / "eval_margins.csv", histogram, ("margin", "pairs"))


def log_to_run(run_id: str, params: Params, evaluation: Evaluation) -> None:
    """Every figure in the policy's MLflow run (`eval/`, `eval_reference/`, and `eval_<name>/`
    per extra set), with each scored split as a run input."""
    sides = [("evaluation", "eval", EVAL_SPLIT, None, evaluation.metrics)]
    for spec in params.eval.datasets:
        origin = (spec.dataset, spec.revision, spec.split)
        figures = evaluation.sets[spec.name]
        split = eval_set(spec.name)[0]
        sides.append((f"evaluation/{spec.name}", f"eval_{spec.name}", split, origin, figures))
    with mlflow.start_run(run_id=run_id):
        for context, prefix, split, origin, figures in sides:
            runs.log_split(split, params, context, origin)
            rest = {k: v for k, v in figures.items() if k != "reference"}
            runs.log_flat_metrics(rest, f"{prefix}/")
            runs.log_flat_metrics(figures["reference"], f"{prefix}_reference/")
