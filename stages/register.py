"""register: models/policy + metrics/eval.json -> a Model Registry version with an alias, and
registry/registered.json (name, version, alias, run id, metrics)."""

import dataclasses
import json
import os
from pathlib import Path

from pipeline.atomic import write_json_atomic
from pipeline.params import load_params
from pipeline.paths import METRICS, MODEL_POLICY, REGISTRY
from pipeline.registry import log_policy, register_policy
from pipeline.tracking import configure, git_commit, read_run_id


def main() -> None:
    params = load_params()
    configure()
    run_id = read_run_id(MODEL_POLICY)
    metrics = json.loads((METRICS / "eval.json").read_text())
    model_uri = log_policy(run_id, MODEL_POLICY)
    tags = {
        "win_rate": metrics["win_rate"],
        "kendall_tau": metrics["kendall_tau"],
        "eval_pairs": metrics["pairs"],
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
        "git_commit": git_commit(Path.cwd()),
        "run_id": run_id,
    }
    reg = register_policy(
        model_uri,
        run_id,
        params.register.model_name,
        params.register.champion_alias,
        params.register.challenger_alias,
        tags,
    )
    write_json_atomic(REGISTRY / "registered.json", dataclasses.asdict(reg))
    beaten = (
        f"beats champion v{reg.previous_champion}" if reg.previous_champion else "first version"
    )
    if reg.alias != params.register.champion_alias:
        beaten = f"does not beat champion v{reg.previous_champion}"
    print(
        f"registered {reg.name} v{reg.version} as @{reg.alias} "
        f"(win rate {metrics['win_rate']:.4f}, {beaten})"
    )


if __name__ == "__main__":
    main()
