"""Model Registry: log the policy to its run, register a version, move the aliases.

The champion alias moves only to a version that beats the current champion on the same held-out
pairs (pipeline/track/champion.py); otherwise the new version is the challenger.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from pipeline.judge.trust import unreliable_reason
from pipeline.params import TokenizeParams
from pipeline.track.champion import (
    ALREADY,
    DIVERGED,
    FIRST,
    RESCORED,
    Comparison,
    Gate,
    Rescore,
    assign_alias,
)
from pipeline.track.runs import provenance_tags

SERVING_CODE = Path(__file__).with_name("serving.py")
# The judge's figures every version records, whichever figure decides the champion, and the
# reward model's accuracy they rest on (judge_reliable is tagged apart, as "true"/"false").
JUDGE_TAGS = (
    "gen_win_rate",
    "gen_win_rate_low",
    "gen_win_rate_high",
    "gen_win_rate_lc",
    "reward_accuracy",
    "reward_accuracy_low",
    "reward_accuracy_high",
    "reward_heldout_pairs",
)
MAX_NEW_TOKENS = 64  # default answer length of the served model
PROMPT_FORMAT_FILE = "prompt_format.json"  # serving.py reads it as the artifact "prompt_format"
# Explicit requirements: MLflow's inference would import every flavour (torchvision among them).
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "pandas", "mlflow")


@dataclasses.dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    run_id: str
    model_uri: str
    comparison: Comparison  # with which champion, on what basis, its figures
    metrics: dict[str, Any]

    def describe(self, champion_alias: str) -> str:
        """One line for the stage's output: what happened and why."""
        seen = self.comparison
        if seen.basis == ALREADY:
            held = f" (@{self.alias})" if self.alias else ""
            return f"nothing new registered: {self.name} v{self.version}{held} {ALREADY}"
        if seen.basis in (FIRST, DIVERGED):
            verdict = seen.basis
        elif seen.champion_figures is None:
            verdict = f"champion v{seen.champion}: {seen.basis}"
        else:
            won = "beats" if self.alias == champion_alias else "does not beat"
            verdict = f"{won} champion v{seen.champion}"
            if seen.basis == RESCORED:
                measured = ", ".join(f"{k} {v:.4f}" for k, v in seen.champion_figures.items())
                how = (
                    "judged on these questions"
                    if "gen_win_rate" in measured
                    else ("re-scored on these held-out pairs")
                )
                verdict += f", {how}: {measured}"
        figures = self.metrics
        # Said whichever gate decided: the gen win rate on this line rests on the judge.
        reason = unreliable_reason(figures)
        return (
            f"registered {self.name} v{self.version} as @{self.alias} (win rate "
            f"{float(figures['win_rate']):.4f}, eval loss {float(figures['eval_loss']):.4f}, "
            f"gen win rate {float(figures['gen_win_rate']):.3f}, {verdict}"
            f"{'' if reason is None else '; ' + reason})"
        )


def version_tags(report: dict[str, Any], judged: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Tags of a new model version from evaluate's and judge's reports: its held-out and
    generation figures (the champion gate reads one pair of them, register.gate decides which),
    the keys saying what they were measured on, whether the judge is reliable, whether its
    training diverged (the train stage's tag on the run), and where it came from."""
    diverged = MlflowClient().get_run(run_id).data.tags.get("diverged", "false")
    return {
        "diverged": diverged,
        "win_rate": report["win_rate"],
        "eval_loss": report["eval_loss"],
        "kendall_tau": report["kendall_tau"],
        "eval_pairs": report["pairs"],
        **report["comparison_key"],
        **{k: judged[k] for k in JUDGE_TAGS},
        "judge_reliable": str(bool(judged["judge_reliable"])).lower(),
        "judge_answers": judged["judge_key"],
        **provenance_tags(),
        "run_id": run_id,
    }


def pip_requirements() -> list[str]:
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def prompt_format(tokenize: TokenizeParams) -> dict[str, Any]:
    """What serving.py needs to ask the policy a question the way the tokenize stage did."""
    return {"template": tokenize.template, "use_chat_template": tokenize.use_chat_template}


def log_policy(run_id: str, policy_dir: Path, tokenize: TokenizeParams) -> str:
    """Log the HF folder as a pyfunc text generator to `run_id`, with the prompt format of
    `tokenize` (the params the policy was trained with); return the model URI."""
    # Declared params let callers pass max_new_tokens and raw to predict(); strings in and out.
    signature = mlflow.models.infer_signature(
        ["How do I reverse a list in Python?"],
        ["..."],
        params={"max_new_tokens": MAX_NEW_TOKENS, "raw": False},
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(run_id=run_id),
        warnings.catch_warnings(),
    ):
        # The format travels with the model: a version loaded later must not read params.yaml.
        format_file = Path(tmp) / PROMPT_FORMAT_FILE
        format_file.write_text(json.dumps(prompt_format(tokenize), indent=2) + "\n")
        # The explicit signature says what an input example would; running one would load and
        # generate with the model at registration time for nothing.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="policy",
            python_model=str(SERVING_CODE),
            artifacts={"policy": str(policy_dir), "prompt_format": str(format_file)},
            pip_requirements=pip_requirements(),
            signature=signature,
        )
    return info.model_uri


def policy_folder(name: str, version: str, dest: Path) -> Path:
    """Download registered `version`'s policy (the HF folder `log_policy` logged) into `dest`."""
    model = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dest))
    )
    # pyfunc stores an artifact under its source folder's name; the MLmodel file maps the key.
    flavor = mlflow.models.Model.load(str(model)).flavors["python_function"]
    return model / flavor["artifacts"]["policy"]["path"]


def already_registered(
    name: str, run_id: str, tags: dict[str, Any], aliases: tuple[str, str]
) -> Registration | None:
    """The version of `name` that already holds `run_id` with these figures and keys (`tags` but
    where they were registered from), if any. The register stage re-runs with unchanged inputs
    when DVC cannot restore it from its run cache; it must not add a copy of that version."""
    provenance = provenance_tags().keys()  # reads git once
    same = {k: str(v) for k, v in tags.items() if k not in provenance}
    client = MlflowClient()
    for held in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if all(held.tags.get(k) == v for k, v in same.items()):
            now = client.get_model_version(name, held.version).aliases
            alias = next((a for a in aliases if a in now), "")
            return Registration(
                name, str(held.version), alias, run_id, held.source, Comparison(ALREADY), tags
            )
    return None


def register_policy(
    model_uri: str,
    run_id: str,
    name: str,
    aliases: tuple[str, str],
    tags: dict[str, Any],
    rescore: Rescore,
    gate: Gate,
) -> Registration:
    """Register a version of `name` and give it the champion or the challenger alias
    (`aliases`); `rescore` scores the champion on this version's held-out pairs if needed."""
    client = MlflowClient()
    version_ = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    alias, comparison = assign_alias(client, name, str(version_.version), aliases, rescore, gate)
    return Registration(
        name, str(version_.version), alias, run_id, model_uri, comparison, dict(tags)
    )
