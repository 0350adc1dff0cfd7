"""register: models/policy + metrics/eval.json -> a Model Registry version with an alias, and
registry/registered.json (name, version, alias, run id, metrics)."""

import dataclasses
import json

from pipeline.params import load_params
from pipeline.stage_io import METRICS, MODEL_POLICY, REGISTRY, run_stage, write_json_atomic
from pipeline.track.registry import log_policy, register_policy, version_tags
from pipeline.track.runs import configure, read_run_id


def main() -> None:
    params = load_params()
    configure()
    run_id = read_run_id(MODEL_POLICY)
    metrics = json.loads((METRICS / "eval.json").read_text())
    model_uri = log_policy(run_id, MODEL_POLICY)
    reg = register_policy(
        model_uri,
        run_id,
        params.register.model_name,
        params.register.champion_alias,
        params.register.challenger_alias,
        version_tags(metrics, run_id),
    )
    write_json_atomic(REGISTRY / "registered.json", dataclasses.asdict(reg))
    print(reg.describe(params.register.champion_alias))


if __name__ == "__main__":
    run_stage(main)
