"""`python -m pipeline.compare`: this commit's experiments on one screen, best first.

Ranked as the register stage's champion gate ranks policies: the higher held-out win rate first
and, at an equal win rate (a small model often ranks the same pairs right), the lower held-out
DPO loss. A win rate shared by several experiments is marked `=`, so a tie is never mistaken for
a difference. Experiments scored on other held-out pairs (another data.eval_size, seed, dataset,
prompt template or model) are ranked in a section of their own: their figures do not compare.
Experiments without held-out figures yet (queued, running, failed) follow, with their state. The
rows come from DVC (`dvc.api.exp_show`, what `dvc exp show` lists), with a win-rate column per extra
held-out set (eval.datasets); with one set of a short name the table fits 80 columns.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

# (header, key in DVC's rows, width): the params and figures that separate DPO runs.
# Widths hold 4-digit figures and keep a row, with one extra set's column, within 80 columns
# (a longer name is cut, a wider
# figure widens its row); tau is kendall_tau, gen_win the judge's generation win rate against
# the base model (the last logged train loss is in `dvc exp show`).
NAME = ("experiment", "Experiment", 20)  # `make demo` names are 20 characters
PARAMS = (("lr", "train.lr", 6), ("beta", "loss.beta", 5))
FIGURES = (
    ("win_rate", "win_rate", 8),
    ("eval_loss", "eval_loss", 9),
    ("tau", "kendall_tau", 7),
    ("gen_win", "gen_win_rate", 8),
)
TIE = "="
# An extra held-out set's win rate (eval.datasets, metrics/eval.json's sets.<name>): a column each.
SET_WIN_RATE = re.compile(r"^sets\.([A-Za-z0-9_-]+)\.win_rate$")
# Params that decide which held-out pairs an experiment is scored on (and how they are tokenized).
HELDOUT_KEYS = (
    "model.name",
    "model.revision",
    "data.dataset",
    "data.revision",
    "data.eval_dir",
    "data.eval_size",
    "data.seed",
    "tokenize.template",
    "tokenize.use_chat_template",
    "tokenize.max_length",
    "tokenize.max_prompt_length",
)


def number(value: Any) -> float | None:
    """A figure from DVC's rows ("!" or None when missing; NaN is no figure either)."""
    try:
        figure = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(figure) else figure


def label(row: dict[str, Any]) -> str:
    """An experiment's name; a baseline row is the workspace or its commit."""
    return row.get("Experiment") or str(row.get("rev") or "?")


def ranked(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows with held-out figures, best first; the other experiments). Baseline rows count only
    when they hold figures (the workspace after a `dvc repro`)."""
    scored = [r for r in rows if number(r.get("win_rate")) is not None]
    waiting = [r for r in rows if r not in scored and r.get("typ") != "baseline"]

    def order(row: dict[str, Any]) -> tuple[float, float]:
        loss = number(row.get("eval_loss"))
        return -number(row["win_rate"]), math.inf if loss is None else loss

    return sorted(scored, key=order), waiting


def param_cell(value: Any, precision: int) -> str:
    """A param in its shortest form (1e-06, 0.001, 0.1)."""
    figure = number(value)
    return "-" if figure is None else f"{figure:.{precision}g}"


def figure_cell(value: Any, precision: int) -> str:
    """A figure with `precision` decimals, so that columns line up and ties read as ties."""
    figure = number(value)
    return "-" if figure is None else f"{figure:.{precision}f}"


def heldout_groups(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Rows grouped by the held-out pairs they were scored on, the largest group first, each
    with what sets it apart ("held-out data.eval_size=200"); one group has no title."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        values = tuple(_setting(row.get(key)) for key in HELDOUT_KEYS)
        groups.setdefault(values, []).append(row)
    if len(groups) < 2:
        return [("", list(rows))]
    apart = [i for i in range(len(HELDOUT_KEYS)) if len({values[i] for values in groups}) > 1]
    return [
        ("held-out " + ", ".join(f"{HELDOUT_KEYS[i]}={values[i]}" for i in apart), members)
        for values, members in sorted(groups.items(), key=lambda group: -len(group[1]))
    ]


def _setting(value: Any) -> str:
    """A param as the user wrote it: 200, not DVC's 200.0."""
    return str(value) if number(value) is None or isinstance(value, bool) else f"{value:g}"


def set_columns(rows: Sequence[dict[str, Any]]) -> tuple[tuple[str, str, int], ...]:
    """A win-rate column per extra held-out set any row has (the table widens with them)."""
    names = sorted({m.group(1) for row in rows for k in row if (m := SET_WIN_RATE.match(k))})
    return tuple((name, f"sets.{name}.win_rate", max(6, len(name))) for name in names)


def table(rows: Sequence[dict[str, Any]], precision: int = 4) -> str:
    """The comparison as text: a header, the ranked experiments (a section per set of held-out
    pairs when there are several), the waiting ones, the notes that apply."""
    best, waiting = ranked(rows)
    groups = heldout_groups(best)
    figures = (*FIGURES, *set_columns(best))
    columns = (*PARAMS, *figures)
    lines, tied = ["#  " + _line((h for h, _, _ in (NAME, *columns)), columns)], False
    for title, members in groups:
        lines += [title + ":"] if title else []
        shared = Counter(figure_cell(r["win_rate"], precision) for r in members)
        tied = tied or max(shared.values(), default=0) > 1
        for place, row in enumerate(members, 1):
            cells = [label(row)]
            cells += [param_cell(row.get(key), precision) for _, key, _ in PARAMS]
            cells += [figure_cell(row.get(key), precision) for _, key, _ in figures]
            cells[len(PARAMS) + 1] += TIE if shared[cells[len(PARAMS) + 1]] > 1 else ""
            lines.append(f"{place:<3}{_line(cells, columns)}")
    for row in waiting:
        state = str(row.get("State") or "no figures").lower()
        lines.append(f"{'-':<3}{_cut(label(row))}  ({state})")
    if tied:
        lines.append(f"{TIE} same win rate: the lower eval_loss ranks first (the champion gate)")
    if len(groups) > 1:
        lines.append("figures on other held-out pairs do not compare: each section ranks its own")
    if not best and not waiting:
        lines.append("no experiments yet: `python -m demo` or `dvc exp run` makes one")
    return "\n".join(lines)


def _line(cells: Iterable[str], columns: Sequence[tuple[str, str, int]]) -> str:
    """The name, two spaces, then the params and figures one space apart, left-aligned."""
    name, *rest = cells
    widths = [w for _, _, w in columns]
    cells = " ".join(f"{c:<{w}}" for c, w in zip(rest, widths, strict=True))
    return f"{_cut(name)}  {cells}".rstrip()


def _cut(name: str) -> str:
    """A name in its column: cut with `~` when longer (figures are never cut)."""
    return f"{name[: NAME[2] - 1]}~" if len(name) > NAME[2] else f"{name:<{NAME[2]}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", type=int, default=4, help="digits of each figure")
    args = parser.parse_args(argv)
    import dvc.api  # here, not at import: `--help` stays instant

    print(table(dvc.api.exp_show(), args.precision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
