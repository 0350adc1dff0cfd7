"""`python -m pipeline.report [BASE] [--rev REV]`: one folder saying what a change did.

Writes `report/` (or `--out`): `report.md` with the headline metrics of REV (default: the
workspace) against BASE (default: main; a branch, commit or DVC experiment name), the params that
differ, the register stage's champion/challenger outcome and the MLflow run; one PNG per plot
that `dvc.yaml` declares; and `plots.html`, the same charts interactive with their JavaScript
inlined, so the page works offline and in a CI artifact viewer. The figures come from DVC itself
(`dvc metrics diff`, `dvc params diff`, `dvc plots diff --json`); the charts are DVC's Vega-Lite
specs rendered by vl-convert, with no browser and no network. This is what CI posts on a pull
request.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE
from typing import Any

from pipeline.stage_io import atomic_dir, require, run_stage

WORKSPACE = "workspace"
REGISTERED = "registry/registered.json"
# What a reviewer looks at first: held-out ranking, the judge, the training loss.
HEADLINE = ("win_rate", "eval_loss", "kendall_tau", "gen_win_rate", "gen_win_rate_lc", "final_loss")


def dvc_outputs(base: str, rev: str) -> dict[str, str]:
    """DVC's metrics diff and params diff (markdown) and plots diff (JSON), run side by side."""
    revs = [base] if rev == WORKSPACE else [base, rev]
    commands = {
        "metrics": ["metrics", "diff", *revs, "--md", "--all", "--precision", "4"],
        "params": ["params", "diff", *revs, "--md"],
        "plots": ["plots", "diff", *revs, "--json"],
    }
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dvc", *args], text=True, stdout=PIPE, stderr=PIPE
        )
        for name, args in commands.items()
    }
    outputs = {}
    for name, process in running.items():
        out, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"error: dvc {' '.join(commands[name])} failed: {err.strip()}")
        outputs[name] = out
    return outputs


def charts(plots_json: str) -> list[tuple[str, dict[str, Any]]]:
    """(title, filled Vega-Lite spec) of each plot `dvc plots diff --json` printed."""
    found = []
    for title, renders in json.loads(plots_json or "{}").get("data", {}).items():
        for render in renders:
            if render.get("type") == "vega":
                found.append((title, render["content"]))
    return found


def slug(title: str) -> str:
    """A file name for a chart title: "Implicit reward margin (chosen - rejected)" ->
    "implicit-reward-margin"."""
    return re.sub(r"[^a-z0-9]+", "-", title.split("(")[0].lower()).strip("-") or "plot"


def headline(metrics_md: str) -> str:
    """The rows of DVC's metrics table (markdown) that hold a HEADLINE metric, in that order,
    under the table's header."""
    lines = metrics_md.strip().splitlines()
    rows = {line.split("|")[2].strip(): line for line in lines[2:] if line.count("|") > 3}
    picked = [rows[name] for name in HEADLINE if name in rows]
    return "\n".join([*lines[:2], *picked]) if picked else "No headline metrics at either revision."


def render_charts(
    found: list[tuple[str, dict[str, Any]]], out: Path, heading: str
) -> list[tuple[str, str]]:
    """One PNG per chart in `out`, and `out/plots.html` with every chart and its JavaScript
    inlined. Returns (title, PNG name) pairs."""
    import vl_convert

    pngs = []
    for title, spec in found:
        name = f"{slug(title)}.png"
        (out / name).write_bytes(vl_convert.vegalite_to_png(spec, scale=2))
        pngs.append((title, name))
    divs = "".join(f'<div id="chart-{i}"></div>' for i in range(len(found)))
    embeds = "".join(
        f"vegaEmbed('#chart-{i}', {json.dumps(spec)});" for i, (_, spec) in enumerate(found)
    )
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{heading}</title></head>'
        f"<body><h1>{heading}</h1>{divs}"
        f'<script type="module">{vl_convert.javascript_bundle(embeds)}</script></body></html>'
    )
    (out / "plots.html").write_text(page, encoding="utf-8")
    return pngs


def read_at(rev: str, path: str) -> str | None:
    """`path` as REV holds it (the workspace, a git revision or a DVC experiment); None if not."""
    if rev == WORKSPACE:
        return Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    commit = _commit(rev)
    if commit is None:
        return None
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def _commit(rev: str) -> str | None:
    """A git revision's commit, or a DVC experiment's (its ref under refs/exps)."""
    parsed = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if parsed.returncode == 0:
        return parsed.stdout.strip()
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    named = [line.split()[0] for line in refs if line.endswith(f"/{rev}")]
    return named[0] if len(named) == 1 else None


def run_link(run_id: str) -> str:
    """Where the MLflow run is: the server's page, or the local store's page under `mlflow ui`."""
    from mlflow import MlflowClient

    from pipeline.track.runs import configure

    uri = configure()
    try:
        experiment = MlflowClient().get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a run from another store: say so, do not fail the report
        return f"`{run_id}` (not in the store at {uri})"
    page = f"#/experiments/{experiment}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"[{run_id[:12]}]({uri.rstrip('/')}/{page})"
    return f"`{run_id}`: `mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def registration(rev: str) -> list[str]:
    """The register stage's outcome and the run it registered, as report lines."""
    text = read_at(rev, REGISTERED)
    if text is None:
        return [f"No `{REGISTERED}` at {rev}: the register stage has not run there."]
    registered = json.loads(text)
    return [
        f"**Registry:** {registered['summary']}",
        "",
        f"**MLflow run:** {run_link(registered['run_id'])}",
    ]


def write_report(base: str, rev: str, out: Path) -> Path:
    """Write the report folder `out` (replaced whole, never half-written); return report.md."""
    outputs = dvc_outputs(base, rev)
    with atomic_dir(out) as staging:
        pngs = render_charts(charts(outputs["plots"]), staging, f"{rev} against {base}")
        lines = [f"# {rev} against {base}", "", *registration(rev), "", "## Metrics", ""]
        lines += [headline(outputs["metrics"]), "", "<details><summary>All metrics</summary>", ""]
        lines += [outputs["metrics"].strip() or "No metrics at either revision.", "", "</details>"]
        lines += [""]
        lines += ["## Params", "", outputs["params"].strip() or "No params differ.", ""]
        lines += ["## Plots", ""]
        lines += [f"![{title}]({name})" for title, name in pngs]
        lines += ["", "Interactive, offline: `plots.html` beside this file."]
        (staging / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "report.md"


def latest_experiment() -> str | None:
    """The newest DVC experiment's name (by its commit's date), or None when there is none."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"],
        stdout=PIPE,
        text=True,
        check=False,
    ).stdout.split()
    return refs[0].rsplit("/", 1)[-1] if refs else None


def rev_to_report(rev: str) -> str:
    """`rev`, or for a workspace without figures (the demo's runs are DVC experiments, which
    leave the workspace as it was) the newest experiment, said in one line; no experiment
    either is one line naming what to run. SystemExit(1) then."""
    if rev != WORKSPACE or Path("metrics/eval.json").is_file():
        return rev
    latest = latest_experiment()
    if latest is None:
        print(
            "error: no figures in the workspace and no DVC experiment to report: `make demo` "
            "or `dvc repro` makes some",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print(
        f"the workspace has no figures: reporting the newest experiment, {latest} "
        "(`make report REV=<name>` names another; `dvc exp list` lists them)",
        file=sys.stderr,
    )
    return latest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", default="main", help="revision to compare against")
    parser.add_argument(
        "--rev", default=WORKSPACE, help="revision or DVC experiment to report (default: workspace)"
    )
    parser.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    args = parser.parse_args(argv)
    require("vl_convert", "report", "make report")
    print(write_report(args.base, rev_to_report(args.rev), args.out))


if __name__ == "__main__":
    run_stage(main)
