"""Measuring the champion like the version that challenges it, for the champion gate.

register.gate picks the figure that decides the champion. When the champion was measured on
other held-out pairs (gate win_rate) or other judged answers (gate gen_win_rate), it is first
measured like this version with the evaluate stage's code (models/base, data/tokenized/eval,
data/reference/eval) or the judge stage's (models/reward, data/judge_base), and the figures are
recorded in this version's MLflow run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from pipeline.evaluate.heldout import score_heldout
from pipeline.evaluate.metrics import headline
from pipeline.judge.verdict import base_answers, figures_of, judged_answers, questions_of
from pipeline.params import Params
from pipeline.resources import on_device
from pipeline.track.champion import Rescore
from pipeline.track.registry import policy_folder


def rescorer(params: Params, run_id: str) -> Rescore:
    """How register.gate measures a champion: on this run's held-out pairs or its questions."""
    return (
        champion_judge(params, run_id)
        if params.register.gate == "gen_win_rate"
        else (champion_scorer(params, run_id))
    )


def champion_scorer(params: Params, run_id: str) -> Rescore:
    """Scores a registered version on this run's held-out pairs, recorded in this run."""

    def rescore(champion: ModelVersion) -> dict[str, float]:
        print(f"register: scoring champion v{champion.version} on this run's held-out pairs")
        with tempfile.TemporaryDirectory() as tmp, on_device(params.eval.device) as runtime:
            folder = policy_folder(champion.name, champion.version, Path(tmp))
            figures = headline(score_heldout(folder, params, runtime, "champion")[0])
        with mlflow.start_run(run_id=run_id):
            # The champion's figures this version was judged against (NaN tau is no figure).
            logged = ("win_rate", "eval_loss", "kendall_tau")
            mlflow.log_metrics(
                {f"register/champion_{k}": figures[k] for k in logged if figures[k] == figures[k]}
            )
        return figures

    return rescore


def champion_judge(params: Params, run_id: str) -> Rescore:
    """Judges a registered version on this run's questions, recorded in this run."""

    def rejudge(champion: ModelVersion) -> dict[str, float]:
        print(f"register: judging champion v{champion.version} on this run's questions")
        base = base_answers()
        with tempfile.TemporaryDirectory() as tmp, on_device(params.judge.device) as runtime:
            folder = policy_folder(champion.name, champion.version, Path(tmp))
            judged = judged_answers(folder, questions_of(base), base, params, runtime)
            figures = figures_of(judged, base, params.judge.seed)
        with mlflow.start_run(run_id=run_id):
            logged = ("gen_win_rate", "gen_win_rate_lc")
            mlflow.log_metrics({f"register/champion_{k}": figures[k] for k in logged})
        return figures

    return rejudge
