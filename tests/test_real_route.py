"""Real models through the real entry points: the README's real-model route on SmolLM2-135M-
Instruct (a pretrained Llama-family model with a chat template), and `dvc repro` on tiny
random-weight models of other families than Qwen3.

The route is its own tier (`-m real`, minutes on 2 cores) and part of the full suite; SmolLM2 is
a Llama-family model. `dvc repro` on a tiny model of each other family of tests/test_families.py
runs with DPO_FAMILIES_E2E=1 (`make test-families`: a few minutes a family).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import transformers
from mlflow import MlflowClient

from tests.e2e import git, run
from tests.test_families import FAMILIES, config_of

pytestmark = pytest.mark.slow


def exp_file(repo: Path, name: str, path: str) -> str:
    """A file of experiment `name`'s commit."""
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    ref = next(r for r in refs if r.rsplit("/", 1)[-1] == name)
    return git(repo, "show", f"{ref}:{path}")


def first_loss(train_csv: str) -> float:
    return float(next(csv.DictReader(io.StringIO(train_csv)))["loss"])


@pytest.mark.real
def test_the_smollm2_route_trains_a_real_model_end_to_end(
    e2e_repo, smollm2_dir: Path, tmp_path: Path
) -> None:
    """`python -m demo --model smollm2` as the README gives it: every stage on the real
    model, a first loss of ln 2, a policy that ranks held-out pairs better than the reference
    (0.5), a judge that states its interval, and a second run that reuses every stage."""
    repo, env = e2e_repo("smollm2")
    command = [sys.executable, "-m", "demo", "--model", "smollm2", "--name", "smol"]
    said = run(repo, env, *command, timeout=1800)
    assert "smol: registered smollm2-dpo v1 as @champion" in said, said[-3000:]
    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name("smollm2-dpo").experiment_id
    (trained,) = client.search_runs([experiment], filter_string="tags.dvc_exp_name = 'smol'")
    losses = client.get_metric_history(trained.info.run_id, "train/loss")
    assert min(losses, key=lambda m: m.step).value == pytest.approx(math.log(2), abs=1e-3)
    held_out = json.loads(exp_file(repo, "smol", "metrics/eval.json"))
    assert held_out["win_rate"] > 0.5, held_out
    reward = json.loads(exp_file(repo, "smol", "metrics/reward.json"))
    interval = (reward["reward_accuracy_low"], reward["reward_accuracy_high"])
    assert interval[0] <= reward["reward_accuracy"] <= interval[1]
    judged = json.loads(exp_file(repo, "smol", "metrics/judge.json"))
    assert judged["judge_reliable"] == (interval[0] > 0.5)
    again = run(repo, env, *[*command[:-1], "smol-again"], timeout=1800)
    reran = re.findall(r"Running stage '(\w+)'", again)
    assert reran == ["register"], again[-3000:]  # the rest from the cache; a new version each


def family_folder(family: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny random-weight model of `family` sized to the demo tokenizer, saved with it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_of(family)
    config.vocab_size = len(tokenizer)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config, key, getattr(tokenizer, key))
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Small enough for a minute or two of DAG per family: what is checked is that every stage runs.
# Plain DPO: the demo's SFT term on a random model is ln(vocabulary), which the train stage's
# divergence rule (a loss above 10 x ln 2) would take for a diverged run.
SMALL = {
    "data.fraction": 0.05,
    "data.eval_size": 32,
    "train.max_steps": 4,
    "train.epochs": 1,
    "train.log_every": 1,
    "loss.sft_weight": 0.0,
    "judge.fraction": 0.03,
    "judge.prompts": 4,
    "judge.max_new_tokens": 16,
}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3"])
def test_dvc_repro_runs_every_stage_on_another_family(
    e2e_repo, demo_model_dir: Path, tmp_path: Path, family: str
) -> None:
    if not os.environ.get("DPO_FAMILIES_E2E"):  # the SmolLM2 route is the Llama family's run
        pytest.skip("DPO_FAMILIES_E2E=1 (make test-families) runs dvc repro on every family")
    model = family_folder(family, tmp_path / family, demo_model_dir)
    repo, env = e2e_repo(f"repro-{family}", demo_params=True, **SMALL, **{"model.name": str(model)})
    said = run(repo, env, "dvc", "repro", timeout=1800)
    assert "registered qwen3-dpo v1 as @champion" in said, said[-3000:]
    rows = (repo / "plots" / "train.csv").read_text()
    assert first_loss(rows) == pytest.approx(math.log(2), abs=1e-3)
    assert "Running stage" not in run(repo, env, "dvc", "repro")  # cached as usual
