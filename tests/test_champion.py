"""The champion gate: like with like, re-scoring a champion measured on other pairs, and a
compare-and-set that stays right when register stages run at once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.judge.trust import accuracy_interval, judge_trust
from pipeline.track import champion as gate
from pipeline.track import runs as tracking
from tests.helpers import REPO

ALIASES = ("champion", "challenger")
KEY = {"heldout_pairs": "pairs-a", "base_model": "base-a", "scoring": "sigmoid-0.1-cpu"}


def test_gate_compares_win_rate_then_held_out_loss() -> None:
    champion = {"win_rate": "0.91", "eval_loss": "0.22"}  # registry tags are strings
    assert gate.beats({"win_rate": 0.92, "eval_loss": 0.5}, champion)
    assert not gate.beats({"win_rate": 0.90, "eval_loss": 0.1}, champion)
    assert gate.beats({"win_rate": 0.91, "eval_loss": 0.2}, champion)  # a tie broken by the loss
    assert not gate.beats({"win_rate": 0.91, "eval_loss": 0.66}, champion)
    assert not gate.beats({"win_rate": 0.91, "eval_loss": 0.22}, champion)  # a full tie keeps it
    assert gate.beats({"win_rate": 0.91, "eval_loss": 0.5}, {"win_rate": "0.91"})  # an old one


def test_the_generation_gate_compares_gen_win_rate_then_its_length_controlled_value() -> None:
    judged = gate.GATES["gen_win_rate"]
    champion = {"gen_win_rate": "0.75", "gen_win_rate_lc": "0.70", "win_rate": "0.99"}
    assert gate.beats(
        {"gen_win_rate": 0.8, "gen_win_rate_lc": 0.1, "win_rate": 0.5}, champion, judged
    )
    assert not gate.beats({"gen_win_rate": 0.7, "gen_win_rate_lc": 0.9}, champion, judged)
    assert gate.beats({"gen_win_rate": 0.75, "gen_win_rate_lc": 0.71}, champion, judged)
    assert not gate.beats({"gen_win_rate": 0.75, "gen_win_rate_lc": 0.70}, champion, judged)
    # A champion registered before the judge existed loses to any judged version.
    assert gate.beats({"gen_win_rate": 0.1, "gen_win_rate_lc": 0.1}, {"win_rate": "0.99"}, judged)


class Rescorer:
    """A stand-in for scoring a champion on this run's pairs: fixed figures, calls counted."""

    def __init__(self, win_rate: float, eval_loss: float = 0.3) -> None:
        self.figures = {"win_rate": win_rate, "eval_loss": eval_loss, "kendall_tau": 0.5}
        self.calls: list[str] = []

    def __call__(self, version) -> dict[str, float]:
        self.calls.append(str(version.version))
        return self.figures


def add_version(client: MlflowClient, store: Path, win_rate: float, **key: str) -> str:
    tags = {"win_rate": str(win_rate), "eval_loss": "0.4", **KEY, **key}
    return str(client.create_model_version("m", str(store), tags=tags).version)


@pytest.fixture
def client(store: Path) -> MlflowClient:
    tracking.configure()
    client = MlflowClient()
    client.create_registered_model("m")
    return client


def test_same_pairs_compare_the_recorded_figures(client: MlflowClient, store: Path) -> None:
    first = add_version(client, store, 0.9)
    never = Rescorer(1.0)
    assert gate.assign_alias(client, "m", first, ALIASES, never) == (
        "champion",
        gate.Comparison(gate.FIRST),
    )
    worse = add_version(client, store, 0.85)
    alias, seen = gate.assign_alias(client, "m", worse, ALIASES, never)
    assert (alias, seen.basis, seen.champion) == ("challenger", gate.SAME_PAIRS, first)
    assert seen.champion_figures == {"win_rate": 0.9, "eval_loss": 0.4}
    assert never.calls == []  # same key: nothing re-scored


def test_a_champion_from_other_pairs_is_rescored_on_these_once(client, store: Path) -> None:
    first = add_version(client, store, 0.95)  # high, but on other pairs
    client.set_registered_model_alias("m", "champion", first)
    rescorer = Rescorer(0.80)  # the champion on the new pairs
    new = add_version(client, store, 0.85, heldout_pairs="pairs-b")
    alias, seen = gate.assign_alias(client, "m", new, ALIASES, rescorer)
    assert (alias, seen.basis, seen.champion) == ("champion", gate.RESCORED, first)
    assert seen.champion_figures == {"win_rate": 0.80, "eval_loss": 0.3}
    assert rescorer.calls == [first]
    # The figures are kept on the re-scored version: the next one on pairs-b reuses them.
    tags = client.get_model_version("m", first).tags
    assert (
        float(tags[f"rescored.{gate.key_digest({**KEY, 'heldout_pairs': 'pairs-b'})}.win_rate"])
        == 0.8
    )
    client.set_registered_model_alias("m", "champion", first)  # back, to test the reuse
    again = add_version(client, store, 0.75, heldout_pairs="pairs-b")
    alias, seen = gate.assign_alias(client, "m", again, ALIASES, rescorer)
    assert (alias, seen.basis) == ("challenger", gate.RESCORED)
    assert rescorer.calls == [first]


def test_other_scoring_settings_are_rescored_too(client, store: Path) -> None:
    client.set_registered_model_alias("m", "champion", add_version(client, store, 0.9))
    rescorer = Rescorer(0.95)
    new = add_version(client, store, 0.92, scoring="ipo-0.5-cpu")
    assert gate.assign_alias(client, "m", new, ALIASES, rescorer)[0] == "challenger"
    assert len(rescorer.calls) == 1


def test_a_champion_from_another_base_model_is_not_compared(client, store: Path) -> None:
    first = add_version(client, store, 0.6)
    client.set_registered_model_alias("m", "champion", first)
    rescorer = Rescorer(0.1)
    new = add_version(client, store, 0.99, base_model="base-b")
    alias, seen = gate.assign_alias(client, "m", new, ALIASES, rescorer)
    assert (alias, seen.basis, seen.champion, seen.champion_figures) == (
        "challenger",
        gate.OTHER_BASE,
        first,
        None,
    )
    assert rescorer.calls == []


def test_a_run_that_diverged_is_never_the_champion(client, store: Path) -> None:
    """Not even as the first version, and not with the best held-out figures."""
    never = Rescorer(0.0)
    diverged = add_version(client, store, 0.99, diverged="true")
    alias, seen = gate.assign_alias(client, "m", diverged, ALIASES, never)
    assert (alias, seen.basis) == ("challenger", gate.DIVERGED)
    sound = add_version(client, store, 0.6, diverged="false")
    assert gate.assign_alias(client, "m", sound, ALIASES, never)[0] == "champion"
    again = add_version(client, store, 0.99, diverged="true")
    assert gate.assign_alias(client, "m", again, ALIASES, never)[0] == "challenger"
    assert str(client.get_model_version_by_alias("m", "champion").version) == sound
    assert never.calls == []


def test_a_version_carries_its_runs_divergence_tag_and_both_gates_figures(client) -> None:
    from pipeline.track.registry import version_tags

    report = {
        "win_rate": 0.9,
        "eval_loss": 0.2,
        "kendall_tau": 0.8,
        "pairs": 10,
        "comparison_key": KEY,
    }
    experiment = client.create_experiment("e")
    tagged = client.create_run(experiment, tags={"diverged": "true"}).info.run_id
    untagged = client.create_run(experiment).info.run_id  # trained before the flag existed
    judged = {
        **{"gen_win_rate": 0.7, "gen_win_rate_low": 0.6, "gen_win_rate_high": 0.8},
        **{"gen_win_rate_lc": 0.65, "judge_key": "answers-a"},
        **judge_trust({**accuracy_interval(0.9, 300), "heldout_pairs": 300}),
    }
    assert version_tags(report, judged, tagged)["diverged"] == "true"
    tags = version_tags(report, judged, untagged)
    assert tags["diverged"] == "false"
    # The reward model's accuracy with its interval, and the flag as the gate reads it.
    assert (tags["reward_accuracy"], tags["reward_heldout_pairs"], tags["judge_reliable"]) == (
        0.9,
        300,
        "true",
    )
    assert tags["reward_accuracy_low"] == pytest.approx(0.8608, abs=5e-5)
    blind = {**judged, **judge_trust({**accuracy_interval(0.52, 80), "heldout_pairs": 80})}
    assert version_tags(report, blind, untagged)["judge_reliable"] == "false"
    # Both gates' figures, whichever decides, and what the judge's were measured on.
    assert (tags["win_rate"], tags["gen_win_rate"], tags["judge_answers"]) == (
        0.9,
        0.7,
        "answers-a",
    )


def test_the_alias_is_set_only_if_the_champion_did_not_move_meanwhile(client, store) -> None:
    old = add_version(client, store, 0.5)
    gate.assign_alias(client, "m", old, ALIASES, Rescorer(0))
    strong = add_version(client, store, 0.9, heldout_pairs="pairs-b")

    class ConcurrentRegister(Rescorer):
        """While this stage scores the old champion, another stage crowns a stronger version."""

        def __call__(self, version) -> dict[str, float]:
            client.set_registered_model_alias("m", "champion", strong)
            return super().__call__(version)

    new = add_version(client, store, 0.7, heldout_pairs="pairs-b")
    alias, seen = gate.assign_alias(client, "m", new, ALIASES, ConcurrentRegister(0.6))
    # Against the old champion (0.6 re-scored) it would have won; it is judged against 0.9.
    assert (alias, seen.basis, seen.champion) == ("challenger", gate.SAME_PAIRS, strong)
    assert str(client.get_model_version_by_alias("m", "champion").version) == strong


RACER = """
import sys, time
import mlflow
from pipeline.track import champion, runs
from tests.helpers import REPO
version, start = sys.argv[1], float(sys.argv[2])
runs.configure()
read = champion.current_champion
def slow_read(*args):  # widen the gap between reading the champion and setting the alias
    found = read(*args)
    time.sleep(1.5)
    return found
champion.current_champion = slow_read
while time.time() < start:
    time.sleep(0.01)
def never(version):
    raise AssertionError("same pairs: nothing to re-score")
client = mlflow.MlflowClient()
print(champion.assign_alias(client, "m", version, ("champion", "challenger"), never)[0])
"""


@pytest.mark.slow  # two racing processes, started together once both have imported (~25 s)
def test_two_registers_at_once_end_with_the_better_one_as_champion(client, store) -> None:
    versions = {"better": add_version(client, store, 0.9), "worse": add_version(client, store, 0.8)}
    start = time.time() + 15  # both processes past their imports, the better one a bit first
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = {
        name: subprocess.Popen(
            [sys.executable, "-c", RACER, version, str(start + (0.2 if name == "worse" else 0))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, version in versions.items()
    }
    said = {name: p.communicate(timeout=120) for name, p in racers.items()}
    # The better one ends as champion whatever the order the lock let them in.
    assert said["better"][0].strip() == "champion", said
    assert str(client.get_model_version_by_alias("m", "champion").version) == versions["better"]


def test_with_the_generation_gate_other_judged_answers_mean_the_champion_is_judged_again(
    client, store: Path
) -> None:
    """Same judge key: the recorded gen_win_rate decides; another key (other questions, base
    answers, decoding or reward model): the champion is judged like the new version, once."""
    judged = gate.GATES["gen_win_rate"]
    judge = {"judge_answers": "answers-a", "gen_win_rate_lc": "0.5"}
    first = add_version(client, store, 0.9, gen_win_rate="0.8", **judge)
    never = Rescorer(0.0)
    assert gate.assign_alias(client, "m", first, ALIASES, never, judged)[0] == "champion"
    # A better held-out win rate does not matter under this gate: the generation win rate does.
    better_pairs = add_version(client, store, 0.99, gen_win_rate="0.7", **judge)
    alias, seen = gate.assign_alias(client, "m", better_pairs, ALIASES, never, judged)
    assert (alias, seen.basis) == ("challenger", gate.SAME_PAIRS)
    assert seen.champion_figures == {"gen_win_rate": 0.8, "gen_win_rate_lc": 0.5}
    rejudge = Rescorer(0.0)
    rejudge.figures = {"gen_win_rate": 0.6, "gen_win_rate_lc": 0.55}
    other = {"judge_answers": "answers-b", "gen_win_rate_lc": "0.6"}
    new = add_version(client, store, 0.5, gen_win_rate="0.65", **other)
    alias, seen = gate.assign_alias(client, "m", new, ALIASES, rejudge, judged)
    assert (alias, seen.basis, rejudge.calls) == ("champion", gate.RESCORED, [first])


def test_the_generation_gate_refuses_to_decide_on_an_unreliable_judge(client, store) -> None:
    """Registered, as the challenger, and the champion keeps its alias: not compared at all, so
    not even a champion judged otherwise is judged again."""
    judged = gate.GATES["gen_win_rate"]
    first = add_version(
        client,
        store,
        0.9,
        gen_win_rate="0.6",
        gen_win_rate_lc="0.6",
        judge_answers="answers-a",
        judge_reliable="true",
    )
    never = Rescorer(0.0)
    assert gate.assign_alias(client, "m", first, ALIASES, never, judged)[0] == "champion"
    for answers in ("answers-a", "answers-b"):  # the same judged answers, and others
        blind = add_version(
            client,
            store,
            0.95,
            gen_win_rate="0.99",
            gen_win_rate_lc="0.99",
            judge_answers=answers,
            judge_reliable="false",
        )
        alias, seen = gate.assign_alias(client, "m", blind, ALIASES, never, judged)
        assert (alias, seen) == ("challenger", gate.Comparison(gate.UNRELIABLE_JUDGE, first))
    assert str(client.get_model_version_by_alias("m", "champion").version) == first
    assert never.calls == []


def test_the_held_out_gate_decides_whatever_the_judge(client, store) -> None:
    first = add_version(client, store, 0.9, judge_reliable="true")
    never = Rescorer(0.0)
    gate.assign_alias(client, "m", first, ALIASES, never)
    blind = add_version(client, store, 0.95, judge_reliable="false")
    assert gate.assign_alias(client, "m", blind, ALIASES, never)[:1] == ("champion",)


def test_a_first_version_takes_the_champion_alias_even_with_an_unreliable_judge(
    client, store
) -> None:
    """No figures are compared for a first version, under any gate: nothing to refuse."""
    judged = gate.GATES["gen_win_rate"]
    blind = add_version(client, store, 0.9, gen_win_rate="0.7", judge_reliable="false")
    assert gate.assign_alias(client, "m", blind, ALIASES, Rescorer(0.0), judged) == (
        "champion",
        gate.Comparison(gate.FIRST),
    )


def registration(alias: str, comparison: gate.Comparison, accuracy: float, pairs: int):
    """What the register stage describes: a version with these figures, given `comparison`."""
    from pipeline.track.registry import Registration

    reward = {**accuracy_interval(accuracy, pairs), "heldout_pairs": pairs}
    figures = {"win_rate": 0.9, "eval_loss": 0.4, "gen_win_rate": 0.7, **judge_trust(reward)}
    return Registration("m", "2", alias, "run", "uri", comparison, figures)


def test_the_register_line_says_why_the_gate_refused() -> None:
    refused = registration("challenger", gate.Comparison(gate.UNRELIABLE_JUDGE, "1"), 0.52, 80)
    assert refused.describe("champion") == (
        "registered m v2 as @challenger (win rate 0.9000, eval loss 0.4000, gen win rate 0.700, "
        "champion v1: kept, not compared: the gen_win_rate gate does not decide on an "
        "unreliable judge; judge unreliable: reward model accuracy 0.520 [0.412, 0.626] on 80 "
        "pairs includes 0.5)"
    )


def test_the_register_line_names_an_unreliable_judge_whatever_the_gate() -> None:
    won = gate.Comparison(gate.SAME_PAIRS, "1", {"win_rate": 0.8, "eval_loss": 0.5})
    assert registration("champion", won, 0.24, 50).describe("champion") == (
        "registered m v2 as @champion (win rate 0.9000, eval loss 0.4000, gen win rate 0.700, "
        "beats champion v1; judge unreliable: reward model accuracy 0.240 [0.143, 0.374] on 50 "
        "pairs lies below 0.5)"
    )
    assert registration("champion", won, 0.9, 300).describe("champion") == (
        "registered m v2 as @champion (win rate 0.9000, eval loss 0.4000, gen win rate 0.700, "
        "beats champion v1)"
    )


def test_a_run_registered_with_the_same_figures_is_not_registered_again(client, store) -> None:
    from pipeline.track.registry import already_registered
    from pipeline.track.runs import provenance_tags

    run = client.create_run(client.create_experiment("e")).info.run_id
    tags = {"win_rate": 0.9, "eval_loss": 0.4, **KEY, "run_id": run}
    held = {**{k: str(v) for k, v in tags.items()}, "dvc_exp_name": "first", "git_commit": "abc"}
    version = client.create_model_version("m", str(store), run_id=run, tags=held).version
    client.set_registered_model_alias("m", "champion", version)
    # Registered from another experiment and commit: the same run and figures all the same.
    again = already_registered("m", run, {**tags, **provenance_tags()}, ALIASES)
    assert again is not None and (again.version, again.alias) == (str(version), "champion")
    assert again.describe("champion") == (
        f"nothing new registered: m v{version} (@champion) already holds this run with these "
        "figures"
    )
    assert already_registered("m", run, {**tags, "eval_loss": 0.41}, ALIASES) is None
    other = client.create_run(client.create_experiment("f")).info.run_id
    assert already_registered("m", other, {**tags, "run_id": other}, ALIASES) is None
    client.delete_registered_model_alias("m", "champion")
    assert already_registered("m", run, tags, ALIASES).alias == ""
