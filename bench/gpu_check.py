"""`make gpu-check`: every GPU claim of the docs measured in one short call on a CUDA machine.

    python bench/gpu_check.py [--steps 12]
    python bench/gpu_check.py --smoke      # the same calls on the CPU, tiny: checks the plumbing

Runs the GPU tests (tests/test_gpu.py), then the bench rows of `bench/dpo_vs_trl.py` in PLAN:
Qwen3-0.6B's shape at 8 and 32 pairs a step (the pipeline's defaults, compiled layers,
activation checkpointing, LoRA, QLoRA, TRL's defaults and TRL's fastest setting) and Qwen3-4B's
shape with LoRA and QLoRA, one repetition each, steady figures from step STEADY_FROM + 1. Rows
whose package is missing (TRL: the `reference` extra; QLoRA: bitsandbytes) are skipped and
named; a row that fails (out of memory, a kernel missing) is marked failed, its error kept in
the JSON, and the others run. Installs nothing. Writes bench/results/gpu-check.json and
gpu-check.md (the table docs/figures.md's GPU figures come from, with the commit, device and
versions), printing the table too. Sized for about 8 minutes on one H100/H200 at --steps 12.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import installed_version  # bench/, beside this script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# (model shape, pairs a step, rows), most wanted first: past --budget-s the rest is not started.
PLAN = (
    (
        "qwen3-0.6b",
        8,
        ("ours", "ours_compile", "ours_ckpt", "ours_lora", "ours_qlora", "trl", "trl_fast"),
    ),
    ("qwen3-0.6b", 32, ("ours", "ours_compile", "trl_fast")),
    ("qwen3-0.6b", 64, ("ours",)),  # the target: no out-of-memory on an 80 GB card
    ("qwen3-4b", 8, ("ours_lora", "ours_qlora")),
)
# --smoke: on the CPU, 5 steps; the QLoRA row fails there (nf4 needs CUDA), the other runs on
SMOKE_PLAN = (("tiny", 2, ("ours", "ours_qlora")),)
NEEDS = {"trl": "trl", "trl_fast": "trl", "ours_qlora": "bitsandbytes"}
# What every row imports (the workspace, the shards, the adapters, the GPU tests): checked first,
# so that a missing one costs one line, not a GPU session's minutes of failed rows.
REQUIRED = ("transformers", "datasets", "pyarrow", "peft", "safetensors", "pytest")
VERSIONS = (*REQUIRED, "trl", "bitsandbytes")


def runnable(rows: tuple[str, ...], skipped: set[str]) -> list[str]:
    """The rows whose packages are installed; the others go to `skipped`."""
    kept = []
    for row in rows:
        package = NEEDS.get(row)
        if package and importlib.util.find_spec(package) is None:
            skipped.add(f"{row} (no {package})")
        else:
            kept.append(row)
    return kept


def preflight() -> dict[str, str | None]:
    """Import what every row needs, stopping with one line naming what fails; the versions of
    the packages the figures depend on (None: not installed)."""
    import importlib

    for package in REQUIRED:
        try:
            importlib.import_module(package)
        except Exception as error:  # an old pyarrow under datasets fails as ImportError or not
            raise SystemExit(f"error: make gpu-check needs {package}: {error}") from None
    return {package: installed_version(package) for package in VERSIONS}


def gpu_tests() -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "",
            "tests/test_gpu.py",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines() or [""]
    return {
        "exit": done.returncode,
        "summary": lines[-1],
        "failures": lines[-40:] if done.returncode else [],
        "seconds": time.perf_counter() - started,
    }


def bench(model: str, batch: int, rows: list[str], steps: int, device: str) -> dict[str, Any]:
    """One `bench/dpo_vs_trl.py` run (a failed row is reported, the others run); its JSON
    report, or the error it ended with."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        done = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "dpo_vs_trl.py"),
                "--device",
                device,
                "--model",
                model,
                "--batch",
                str(batch),
                "--steps",
                str(steps),
                "--reps",
                "1",
                "--rows",
                ",".join(rows),
                "--out",
                str(out),
                "--keep-going",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode or not out.is_file():
            return {"error": (done.stdout + done.stderr)[-3000:]}
        return json.loads(out.read_text())


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: shape, batch, setting, steady pairs/s, MFU, peak GB, against TRL."""
    lines = [
        "| model | pairs/step | setting | pairs/s | MFU | peak GB | x TRL fastest |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['model']} | {result['batch']} | failed: see the JSON |||||")
            continue
        median = result["report"]["median"]
        fastest = median.get("trl_fast", {}).get("steady_pairs_per_s")
        for row, figures in median.items():
            pairs, mfu = figures["steady_pairs_per_s"], figures["mfu"]
            versus = f"{pairs / fastest:.2f}" if fastest else "-"
            lines.append(
                f"| {result['model']} | {result['batch']} | {row} | {pairs:.1f} | "
                f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {figures['peak_mb'] / 1024:.1f} "
                f"| {versus} |"
            )
        for row in result["report"].get("failed", {}):
            lines.append(
                f"| {result['model']} | {result['batch']} | {row} | failed: see the JSON ||||"
            )
    return lines


def header(
    steps: int, device: str, skipped: set[str], tests: dict[str, Any], versions: dict
) -> str:
    """The table's first line: commit, device, versions, what was skipped, the tests' verdict."""
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    where = f"cpu, torch {torch.__version__}"
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        where += f" (CUDA {torch.version.cuda})"
    where += "".join(f", {name} {v}" for name, v in versions.items() if v and name != "pytest")
    return (
        f"commit {commit or 'unknown'}, {where}, {steps} steps a row; skipped: "
        f"{', '.join(sorted(skipped)) or 'none'}; GPU tests: {tests['summary']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per bench row")
    parser.add_argument(
        "--budget-s", type=float, default=480, help="start no plan entry after this many seconds"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny rows on the CPU, no GPU tests: no figures"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and table")
    args = parser.parse_args()
    import torch

    device, plan, steps = ("cpu", SMOKE_PLAN, 5) if args.smoke else ("cuda", PLAN, args.steps)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: make gpu-check needs a CUDA device (torch sees none)")
    versions = preflight()
    started, skipped, results = time.perf_counter(), set(), []
    tests = {"summary": "not run (--smoke)"} if args.smoke else gpu_tests()
    print(f"GPU tests: {tests['summary']} ({time.perf_counter() - started:.0f} s)", flush=True)
    for model, batch, rows in plan:
        if time.perf_counter() - started > args.budget_s:
            skipped.add(f"{model} at {batch} pairs/step (past --budget-s {args.budget_s:.0f})")
            continue
        result = bench(model, batch, runnable(rows, skipped), steps, device)
        results.append(
            {
                "model": model,
                "batch": batch,
                **({"report": result} if "error" not in result else result),
            }
        )
        print(
            f"{model}, {batch} pairs/step: {'failed' if 'error' in result else 'done'} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        first = header(steps, device, skipped, tests, versions)
        write(args.out, first, tests, results, skipped, started)
    first = header(steps, device, skipped, tests, versions)
    lines = write(args.out, first, tests, results, skipped, started)
    print("\n".join(lines))
    print(f"written: {args.out / 'gpu-check.json'}, {args.out / 'gpu-check.md'}")


def write(out: Path, first: str, tests: dict, results: list, skipped: set, started: float) -> list:
    """The JSON and the table so far (after each plan entry: a call stopped at its time limit
    still leaves what it measured); returns the table's lines."""
    lines = [first, "", *table(results)]
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "header": first,
        "tests": tests,
        "results": results,
        "skipped": sorted(skipped),
        "seconds": time.perf_counter() - started,
    }
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
