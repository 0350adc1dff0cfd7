"""register: models/policy + reports/eval.json + reports/judge.json -> a Model Registry version
with an alias, and registry/registered.json (name, version, alias, run id, metrics, what it was
compared with, and the stage's one-line summary). register.gate picks the figure that decides
the champion (pipeline/track/champion.py); a champion measured on other pairs or answers is
measured again like this version first (pipeline/track/rescore.py)."""

import dataclasses
import json

from pipeline.params import load_params
from pipeline.stage_io import MODEL_POLICY, REGISTRY, REPORTS, run_stage, write_json_atomic
from pipeline.track import registry
from pipeline.track.champion import GATES
from pipeline.track.rescore import rescorer
from pipeline.track.runs import configure, read_run_id


def main() -> None:
    params = load_params()
    configure()
    run_id = read_run_id(MODEL_POLICY)
    report = json.loads((REPORTS / "eval.json").read_text())
    judged = json.loads((REPORTS / "judge.json").read_text())
    aliases = (params.register.champion_alias, params.register.challenger_alias)
    name = params.register.model_name
    tags = registry.version_tags(report, judged, run_id)
    reg = registry.already_registered(name, run_id, tags, aliases) or registry.register_policy(
        registry.log_policy(run_id, MODEL_POLICY, params.tokenize),
        run_id,
        name,
        aliases,
        tags,
        rescorer(params, run_id),
        GATES[params.register.gate],
    )
    summary = reg.describe(params.register.champion_alias)
    write_json_atomic(REGISTRY / "registered.json", {**dataclasses.asdict(reg), "summary": summary})
    print(summary)


if __name__ == "__main__":
    run_stage(main)
