"""The champion gate: which registered version holds the champion alias, decided like with like.

A version's held-out figures are only comparable with another's when both were measured on the
same held-out pairs, against the same base model, scored the same way: each version carries that
`comparison_key` (pipeline/evaluate/heldout.py) among its tags. Against a champion measured on
other pairs (another data.eval_size, data.seed, dataset or prompt template) the register stage
first scores the champion on this run's pairs; a champion trained from another base model is not
compared at all (its implicit rewards are log-ratios against another reference), so a new version
never takes its alias automatically: promote it by hand or register it under another name.

With `register.gate: gen_win_rate` the same holds for the judge's figures: comparable when the
judged questions, the base model's scored answers, the decoding and the reward model are the same
(one digest of data/judge_base); otherwise the champion is first judged on this run's questions.
That gate does not decide on a judge whose reward model cannot be told from a coin (the version's
`judge_reliable` tag is "false", pipeline/judge/trust.py): the version is registered as the
challenger and the champion keeps its alias. Failing the stage instead would lose the run's
registration, and its held-out figures, for a fault of the judge, not of the policy. A first
version still takes the champion alias: no figures are compared then, under any gate.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.stage_io import repo_root


@dataclasses.dataclass(frozen=True)
class Gate:
    """What decides the champion (register.gate): figures compared in order, each with the
    direction that wins (+1 higher, -1 lower), and the version tags that must be equal for two
    versions' figures to be comparable."""

    order: tuple[tuple[str, int], ...]
    key_tags: tuple[str, ...]
    # Its figures are the judge's: an unreliable judge (tag judge_reliable "false") decides nothing.
    judged: bool = False

    @property
    def figures(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.order)


GATES = {
    # Held-out pair win rate, then the lower held-out DPO loss (tiny models often rank the same
    # pairs right): comparable on the same pairs, base model and scoring.
    "win_rate": Gate(
        (("win_rate", 1), ("eval_loss", -1)), ("heldout_pairs", "base_model", "scoring")
    ),
    # Generation win rate against the base model, then its length-controlled value: comparable
    # on the same judged questions, base answers, decoding and reward model (one digest).
    "gen_win_rate": Gate(
        (("gen_win_rate", 1), ("gen_win_rate_lc", 1)), ("judge_answers", "base_model"), True
    ),
}
# A champion's figures measured like this version's: its ModelVersion -> {figure: value}.
Rescore = Callable[[ModelVersion], dict[str, float]]

FIRST, SAME_PAIRS, RESCORED, OTHER_BASE, DIVERGED, UNRELIABLE_JUDGE, ALREADY = (
    "first version",
    "same held-out pairs",
    "champion re-scored on these held-out pairs",
    "champion trained from another base model, not compared",
    "its training diverged (a train loss above 10 x ln 2): never the champion",
    "kept, not compared: the gen_win_rate gate does not decide on an unreliable judge",
    "already holds this run with these figures",
)


@dataclasses.dataclass(frozen=True)
class Comparison:
    basis: str  # FIRST, SAME_PAIRS, RESCORED, OTHER_BASE, DIVERGED, UNRELIABLE_JUDGE, ALREADY
    champion: str | None = None  # the version compared with
    champion_figures: dict[str, float] | None = None  # its figures the decision used


def beats(new: dict[str, Any], champion: dict[str, Any], gate: Gate = GATES["win_rate"]) -> bool:
    """The gate's figures in order, the first that differs decides; a full tie keeps the
    champion. A champion without a figure (registered before it existed) loses on it."""
    for name, direction in gate.order:
        missing = "-inf" if direction > 0 else "inf"
        mine, theirs = float(new[name]), float(champion.get(name, missing))
        if mine != theirs:
            return (mine - theirs) * direction > 0
    return False


def current_champion(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def key_digest(tags: dict[str, Any], gate: Gate = GATES["win_rate"]) -> str:
    """A short name for a comparison key, used to keep re-scored figures on the champion."""
    joined = "/".join(str(tags.get(k)) for k in gate.key_tags)
    return hashlib.sha256(joined.encode()).hexdigest()[:12]


def champion_figures(
    client: MlflowClient,
    new: dict[str, Any],
    champion: ModelVersion,
    rescore: Rescore,
    gate: Gate = GATES["win_rate"],
) -> Comparison:
    """The champion's figures comparable with the `new` version's tags (see module doc)."""
    theirs, figures = champion.tags, gate.figures
    if all(theirs.get(k) == new.get(k) for k in gate.key_tags):
        return Comparison(SAME_PAIRS, str(champion.version), {k: float(theirs[k]) for k in figures})
    # Versions registered before keys existed have none: assumed to share the base model.
    if theirs.get("base_model", new["base_model"]) != new["base_model"]:
        return Comparison(OTHER_BASE, str(champion.version))
    prefix = f"rescored.{key_digest(new, gate)}."  # kept on the champion: later versions skip it
    if all(prefix + k in theirs for k in figures):
        measured = {k: float(theirs[prefix + k]) for k in figures}
    else:
        scored = rescore(champion)
        measured = {k: float(scored[k]) for k in figures}
        for k, value in measured.items():
            client.set_model_version_tag(champion.name, champion.version, prefix + k, str(value))
    return Comparison(RESCORED, str(champion.version), measured)


def compare(
    client: MlflowClient,
    new: dict[str, Any],
    champion: ModelVersion | None,
    rescore: Rescore,
    gate: Gate,
) -> Comparison:
    """What the `new` version's tags are compared with: nothing for the first version; nothing
    either when the gate reads the judge's figures and the judge is unreliable (the champion
    keeps its alias); otherwise the champion's figures measured like the new version's."""
    if champion is None:
        return Comparison(FIRST)
    if gate.judged and new.get("judge_reliable") == "false":
        return Comparison(UNRELIABLE_JUDGE, str(champion.version))
    return champion_figures(client, new, champion, rescore, gate)


def assign_alias(
    client: MlflowClient,
    name: str,
    version: str,
    aliases: tuple[str, str],
    rescore: Rescore,
    gate: Gate = GATES["win_rate"],
) -> tuple[str, Comparison]:
    """Compare `version` with the current champion and give it the champion or the challenger
    alias (`aliases`) -> (alias, comparison).

    Comparing may mean scoring the champion (minutes on a real model), so it runs outside the
    lock; the set runs under a lock beside the tracking store and only if the champion is still
    the one compared with (a compare-and-set): two register stages finishing together (parallel
    queue workers) would otherwise both take the alias, the worse one possibly last.
    """
    champion_alias, challenger_alias = aliases
    new = client.get_model_version(name, version).tags
    if new.get("diverged") == "true":  # whatever its held-out figures say
        client.set_registered_model_alias(name, challenger_alias, version)
        return challenger_alias, Comparison(DIVERGED)
    while True:
        champion = current_champion(client, name, champion_alias)
        comparison = compare(client, new, champion, rescore, gate)
        wins = comparison.basis == FIRST or (
            comparison.champion_figures is not None
            and beats(new, comparison.champion_figures, gate)
        )
        with FileLock(str(repo_root() / ".mlflow-registry.lock"), timeout=600):
            now = current_champion(client, name, champion_alias)
            if (now and now.version) != (champion and champion.version):
                continue  # another register moved the alias meanwhile: compare again
            client.set_registered_model_alias(
                name, champion_alias if wins else challenger_alias, version
            )
        return (champion_alias if wins else challenger_alias), comparison
