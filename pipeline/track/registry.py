"""Model Registry: log the policy to its run, register a version, move the aliases.

The champion alias moves only to a version that `beats` the current champion on the held-out
pairs (win rate first, then DPO loss); otherwise the new version is the challenger.
"""

from __future__ import annotations

import dataclasses
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.stage_io import repo_root
from pipeline.track.runs import provenance_tags

SERVING_CODE = Path(__file__).with_name("serving.py")
MAX_NEW_TOKENS = 64  # default answer length of the served model
# Explicit requirements: MLflow's inference would import every flavour (torchvision among them).
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "pandas", "mlflow")


@dataclasses.dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    run_id: str
    model_uri: str
    previous_champion: str | None
    metrics: dict[str, Any]

    def describe(self, champion_alias: str) -> str:
        """One line for the stage's output: what happened and why."""
        if self.previous_champion is None:
            verdict = "first version"
        elif self.alias == champion_alias:
            verdict = f"beats champion v{self.previous_champion}"
        else:
            verdict = f"does not beat champion v{self.previous_champion}"
        return (
            f"registered {self.name} v{self.version} as @{self.alias} (win rate "
            f"{float(self.metrics['win_rate']):.4f}, eval loss "
            f"{float(self.metrics['eval_loss']):.4f}, {verdict})"
        )


def version_tags(metrics: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Tags of a new model version: its held-out figures (the champion gate reads win_rate) and
    where it came from."""
    return {
        "win_rate": metrics["win_rate"],
        "eval_loss": metrics["eval_loss"],
        "kendall_tau": metrics["kendall_tau"],
        "eval_pairs": metrics["pairs"],
        **provenance_tags(),
        "run_id": run_id,
    }


def pip_requirements() -> list[str]:
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def log_policy(run_id: str, policy_dir: Path) -> str:
    """Log the HF folder as a pyfunc text generator to `run_id`; return the model URI."""
    # Declared params let callers pass max_new_tokens to predict(); strings in, strings out.
    signature = mlflow.models.infer_signature(
        ["Question: ...\n\nAnswer: "], ["..."], params={"max_new_tokens": MAX_NEW_TOKENS}
    )
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The explicit signature says what an input example would; running one would load and
        # generate with the model at registration time for nothing.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="policy",
            python_model=str(SERVING_CODE),
            artifacts={"policy": str(policy_dir)},
            pip_requirements=pip_requirements(),
            signature=signature,
        )
    return info.model_uri


def current_champion(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def beats(new: dict[str, Any], champion: dict[str, Any]) -> bool:
    """The champion gate: a higher held-out win rate wins; at an equal win rate (tiny models
    often rank the same pairs right) the lower held-out DPO loss wins; a full tie keeps the
    champion. A champion registered without an eval_loss tag loses such a tie."""
    new_rate, old_rate = float(new["win_rate"]), float(champion.get("win_rate", "-inf"))
    if new_rate != old_rate:
        return new_rate > old_rate
    return float(new["eval_loss"]) < float(champion.get("eval_loss", "inf"))


def assign_alias(
    client: MlflowClient, name: str, version: str, champion_alias: str, challenger_alias: str
) -> tuple[str, Any | None]:
    """Compare `version` with the current champion and set its alias -> (alias, champion seen).

    The read-compare-set runs under a lock beside the tracking store: two register stages that
    finish together (parallel queue workers) would otherwise both read the old champion and both
    take the alias, the worse one possibly last.
    """
    with FileLock(str(repo_root() / ".mlflow-registry.lock"), timeout=600):
        new = client.get_model_version(name, version)
        champion = current_champion(client, name, champion_alias)
        wins = champion is None or beats(new.tags, champion.tags)
        alias = champion_alias if wins else challenger_alias
        client.set_registered_model_alias(name, alias, version)
    return alias, champion


def register_policy(
    model_uri: str,
    run_id: str,
    name: str,
    champion_alias: str,
    challenger_alias: str,
    tags: dict[str, Any],
) -> Registration:
    """Register a version of `name` and give it the champion or the challenger alias."""
    client = MlflowClient()
    version_ = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    alias, champion = assign_alias(client, name, str(version_.version), champion_alias,
                                   challenger_alias)  # fmt: skip
    return Registration(
        name,
        str(version_.version),
        alias,
        run_id,
        model_uri,
        None if champion is None else str(champion.version),
        dict(tags),
    )
