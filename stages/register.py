"""register: models/policy + reports/eval.json -> a Model Registry version with an alias, and
registry/registered.json (name, version, alias, run id, metrics, what it was compared with, and
the stage's one-line summary).

When the champion was evaluated on other held-out pairs, it is first scored on this run's pairs
with the evaluate stage's code (models/base, data/tokenized/eval and data/reference/eval)."""

import dataclasses
import json
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from pipeline.evaluate.heldout import score_heldout
from pipeline.evaluate.metrics import headline
from pipeline.model.loading import resolve_runtime
from pipeline.params import Params, load_params
from pipeline.resources import stage_share
from pipeline.stage_io import MODEL_POLICY, REGISTRY, REPORTS, run_stage, write_json_atomic
from pipeline.track.champion import Rescore
from pipeline.track.registry import log_policy, policy_folder, register_policy, version_tags
from pipeline.track.runs import configure, read_run_id


def champion_scorer(params: Params, run_id: str) -> Rescore:
    """Scores a registered version on this run's held-out pairs, recorded in this run."""

    def rescore(champion: ModelVersion) -> dict[str, float]:
        print(f"register: scoring champion v{champion.version} on this run's held-out pairs")
        runtime = resolve_runtime(params.eval.device)
        with tempfile.TemporaryDirectory() as tmp, stage_share(params.eval.device):
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


def main() -> None:
    params = load_params()
    configure()
    run_id = read_run_id(MODEL_POLICY)
    report = json.loads((REPORTS / "eval.json").read_text())
    model_uri = log_policy(run_id, MODEL_POLICY)
    reg = register_policy(
        model_uri,
        run_id,
        params.register.model_name,
        (params.register.champion_alias, params.register.challenger_alias),
        version_tags(report, run_id),
        champion_scorer(params, run_id),
    )
    summary = reg.describe(params.register.champion_alias)
    write_json_atomic(REGISTRY / "registered.json", {**dataclasses.asdict(reg), "summary": summary})
    print(summary)


if __name__ == "__main__":
    run_stage(main)
