"""What a finished study leaves: the best trial and the commands that reproduce it, Optuna's plots
in reports/tune/<study>/, and a parent MLflow run that lists the trial runs as its children."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.search_space import (
    Spec,
)


def best_summary(study: Any, spec: Spec, demo: bool) -> list[str]:
    """What a user reads at the end: the best trial and how to get it back."""
    best = study.best_trial
    name, metrics = best.user_attrs["experiment"], best.user_attrs.get("metrics", {})
    figures = ", ".join(
        f"{m} {metrics[m]:.4f}" for m in (spec.objective, spec.tie_break) if m and m in metrics
    )
    fixed = [f"-S {item}" for item in study.user_attrs.get("fixed", [])]
    values = " ".join([*fixed, *(f"-S {k}={v:.6g}" for k, v in best.params.items())])
    again = "python -m demo" if demo else "dvc exp run"
    return [
        f"best: trial {best.number} ({name}): {figures}; "
        + ", ".join(f"{k} {v:.4g}" for k, v in best.params.items()),
        f"its results in the workspace:  dvc exp apply {name}",
        f"run it again:                  {again} {values}",
    ]


def write_plots(study: Any, spec: Spec, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances and (for two or more keys) the contour of the
    first two keys, as PNG files in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    keys = [d.key for d in spec.space]
    drawings = {"history": lambda: plots.plot_optimization_history(study)}
    if len(keys) > 1:
        drawings["importances"] = lambda: plots.plot_param_importances(study)
        drawings["contour"] = lambda: plots.plot_contour(study, params=keys[:2])
    written = []
    for name, draw in drawings.items():
        axes = draw()
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
        written.append(folder / f"{name}.png")
    return written


def log_parent_run(study: Any, spec: Spec, plots: list[Path]) -> str:
    """One MLflow run for the study, named tune-<study>, with the best figures and the plots;
    each trial's training run becomes its child (the `mlflow.parentRunId` tag)."""
    import mlflow

    from pipeline.track.runs import configure, experiment_id

    configure()
    client = mlflow.MlflowClient()
    experiment = experiment_id("qwen3-dpo")
    tag = f"tags.tune_study = '{study.study_name}'"
    found = client.search_runs([experiment], filter_string=f"{tag} and tags.tune_parent = 'true'")
    parent = (
        found[0].info.run_id
        if found
        else client.create_run(
            experiment,
            run_name=f"tune-{study.study_name}",
            tags={"tune_study": study.study_name, "tune_parent": "true"},
        ).info.run_id
    )
    for trial in study.get_trials(deepcopy=False):
        name = trial.user_attrs.get("experiment")
        runs = client.search_runs([experiment], filter_string=f"tags.dvc_exp_name = '{name}'")
        for child in runs if name else []:
            client.set_tag(child.info.run_id, "mlflow.parentRunId", parent)
            client.set_tag(child.info.run_id, "tune_study", study.study_name)
    best = study.best_trial
    for key, value in best.params.items():
        client.log_param(parent, f"best.{key}", f"{value:.6g}")
    client.log_metric(parent, f"best_{spec.objective}", best.user_attrs["metrics"][spec.objective])
    for path in plots:
        client.log_artifact(parent, str(path), artifact_path="tune")
    client.set_terminated(parent)  # FINISHED; a resumed study logs to it again
    return parent
