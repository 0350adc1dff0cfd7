"""The one-screen comparison: ranked as the champion gate ranks, ties shown, 80 columns."""

from __future__ import annotations

import logging

from demo.dvc_cli import actionable
from pipeline.compare import table


def row(name: str, win_rate, eval_loss, **extra) -> dict:
    """A row as `dvc.api.exp_show` gives it (params may be DVC's strings, "!" when missing)."""
    return {
        "Experiment": name,
        "typ": "branch_base",
        "rev": "abc1234",
        "train.lr": "1e-06",
        "loss.beta": 0.1,
        "win_rate": win_rate,
        "eval_loss": eval_loss,
        "kendall_tau": 0.83036,
        "gen_win_rate": 0.8125,
        **extra,
    }


def ranked_names(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line[:1].isdigit()]


def test_higher_win_rate_first_then_lower_eval_loss() -> None:
    rows = [row("low", 0.80, 0.1), row("tied-worse", 0.9, 0.6), row("tied-better", 0.9, 0.2)]
    text = table(rows)
    assert ranked_names(text) == ["tied-better", "tied-worse", "low"]
    lines = text.splitlines()
    assert "0.9000=" in lines[1] and "0.9000=" in lines[2] and "0.8000 " in lines[3]
    assert lines[-1].startswith("= same win rate")


def test_no_tie_no_marks_and_precision_is_honoured() -> None:
    text = table([row("a", 0.912621, 0.22079), row("b", 0.5, 0.69)], precision=2)
    assert "=" not in text
    assert "0.91 " in text and "0.22 " in text and "1e-06" in text


def test_waiting_experiments_follow_with_their_state_and_baselines_without_figures_do_not() -> None:
    rows = [
        {"Experiment": None, "rev": "workspace", "typ": "baseline", "win_rate": "!"},
        row("queued-one", "!", "!", State="Queued"),
        row("done", 0.7, 0.5),
    ]
    lines = table(rows).splitlines()
    assert ranked_names("\n".join(lines)) == ["done"]
    assert lines[-1].split() == ["-", "queued-one", "(queued)"]
    assert "workspace" not in "\n".join(lines)


def test_every_line_fits_80_columns_even_with_long_names() -> None:
    rows = [
        row(
            "a-very-long-experiment-name-indeed",
            0.912621359223301,
            0.2207981,
            **{"train.lr": 0.000123456, "gen_win_rate": 12345.678},
        )
    ]
    text = table(rows)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "a-very-long-experim~" in text


def test_the_demo_hides_only_dvc_messages_a_user_cannot_act_on() -> None:
    def record(message: str, cause: Exception | None = None) -> logging.LogRecord:
        error = None
        if cause is not None:
            error = RuntimeError("failed to reproduce 'train'")
            error.__cause__ = cause
        exc_info = (RuntimeError, error, None) if error else None
        return logging.LogRecord("dvc", logging.ERROR, __file__, 1, message, None, exc_info)

    assert not actionable(record("No file hash info found for 'x'. It won't be created."))
    stopped = RuntimeError("failed to run: python -m stages.train, exited with 130")
    assert not actionable(record("", stopped))
    assert actionable(
        record("", RuntimeError("failed to run: python -m stages.train, exited with 1"))
    )
    assert actionable(record("Experiment conflicts with existing experiment 'x'"))


def test_experiments_on_other_held_out_pairs_are_ranked_apart() -> None:
    """An eval_size 200 run's win rate is over other pairs: never ranked above a 300 one."""
    rows = [
        row("small-eval", 0.95, 0.18, **{"data.eval_size": 200.0}),
        row("a", 0.91, 0.22, **{"data.eval_size": 300}),
        row("b", 0.90, 0.23, **{"data.eval_size": 300}),
    ]
    lines = table(rows).splitlines()
    assert lines[1] == "held-out data.eval_size=300:"
    assert [line.split()[:2] for line in lines[2:4]] == [["1", "a"], ["2", "b"]]
    assert lines[4] == "held-out data.eval_size=200:"
    assert lines[5].split()[:2] == ["1", "small-eval"]
    assert lines[-1].startswith("figures on other held-out pairs do not compare")


def test_only_queued_experiments_are_listed_with_their_state() -> None:
    lines = table([row("typic-scow", "!", "!", State="Queued")]).splitlines()
    assert lines[1:] == ["-  typic-scow            (queued)"]


def test_each_extra_held_out_set_gets_a_win_rate_column() -> None:
    rows = [row("a", 0.9, 0.2, **{"sets.other.win_rate": 0.61}), row("b", 0.8, 0.3)]
    header, first, second = table(rows).splitlines()[:3]
    assert header.split()[-1] == "other"
    assert first.split()[-1] == "0.6100" and second.split()[-1] == "-"
    assert header.index("other") == first.index("0.6100")  # the column lines up
