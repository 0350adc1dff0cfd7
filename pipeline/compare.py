"""`python -m pipeline.compare`: this commit's experiments on one screen, best first.

Ranked as the register stage's champion gate ranks policies: the higher held-out win rate first
and, at an equal win rate (a small model often ranks the same pairs right), the lower held-out
DPO loss. A win rate shared by several experiments is marked `=`, so a tie is never mistaken for
a difference. Experiments without held-out figures yet (queued, running, failed) follow, with
their state. The rows come from DVC (`dvc.api.exp_show`, what `dvc exp show` lists); the table
fits 80 columns.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

# (header, key in DVC's rows, width): the params and figures that separate DPO runs.
# Widths keep a row within 80 columns; tau is kendall_tau, final_loss the last train loss.
NAME = ("experiment", "Experiment", 18)
PARAMS = (("lr", "train.lr", 8), ("beta", "train.beta", 5))
FIGURES = (
    ("win_rate", "win_rate", 8),
    ("eval_loss", "eval_loss", 9),
    ("tau", "kendall_tau", 6),
    ("final_loss", "final_loss", 10),
)
TIE = "="


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


def table(rows: Sequence[dict[str, Any]], precision: int = 4) -> str:
    """The comparison as text: a header, one line per experiment, the tie note when needed."""
    best, waiting = ranked(rows)
    shared = Counter(figure_cell(r["win_rate"], precision) for r in best)
    columns = (NAME, *PARAMS, *FIGURES)
    lines = ["#  " + "  ".join(f"{h:<{w}}" for h, _, w in columns).rstrip()]
    for place, row in enumerate(best, 1):
        cells = [label(row)]
        cells += [param_cell(row.get(key), precision) for _, key, _ in PARAMS]
        cells += [figure_cell(row.get(key), precision) for _, key, _ in FIGURES]
        if shared[cells[len(PARAMS) + 1]] > 1:
            cells[len(PARAMS) + 1] += TIE
        text = "  ".join(_fit(c, w) for c, (_, _, w) in zip(cells, columns, strict=True))
        lines.append(f"{place:<3}{text}".rstrip())
    for row in waiting:
        state = str(row.get("State") or "no figures").lower()
        lines.append(f"{'-':<3}{_fit(label(row), NAME[2])}  ({state})")
    if any(count > 1 for count in shared.values()):
        lines.append(f"{TIE} same win rate: the lower eval_loss ranks first (the champion gate)")
    if not best and not waiting:
        lines.append("no experiments yet: `python -m pipeline.demo` or `dvc exp run` makes one")
    return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    return f"{text[: width - 1]}~" if len(text) > width else f"{text:<{width}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", type=int, default=4, help="digits of each figure")
    args = parser.parse_args(argv)
    import dvc.api  # here, not at import: `--help` stays instant

    print(table(dvc.api.exp_show(), args.precision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
