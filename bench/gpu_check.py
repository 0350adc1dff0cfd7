"""`make gpu-check`: every GPU claim of the README measured in one short call on a CUDA machine.

    python bench/gpu_check.py [--steps 12]

Runs the GPU tests (tests/test_gpu.py, and tests/test_compile.py on the GPU's torch), then the
bench rows of `bench/dpo_vs_trl.py` in PLAN: Qwen3-0.6B's shape at 8 and 32 pairs a step (the
pipeline's defaults, compiled layers, activation checkpointing, LoRA, QLoRA, TRL's defaults and
TRL's fastest setting) and Qwen3-4B's shape with LoRA and QLoRA, one repetition each, steady
figures from step STEADY_FROM + 1. Rows whose package is missing (TRL: the `reference` extra;
QLoRA: bitsandbytes) are skipped and named. Installs nothing. Writes bench/results/gpu-check.json
and gpu-check.md (the table the README's GPU figures come from, with the commit, device and
versions), printing the table too. Sized for about 8 minutes on one H100/H200 at --steps 12.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PLAN = (  # (model shape, pairs a step, rows)
    ("qwen3-0.6b", 8, ("ours", "ours_compile", "ours_ckpt", "ours_lora", "ours_qlora", "trl",
                       "trl_fast")),
    ("qwen3-0.6b", 32, ("ours", "ours_compile", "trl_fast")),
    ("qwen3-4b", 8, ("ours_lora", "ours_qlora")),
)  # fmt: skip
NEEDS = {"trl": "trl", "trl_fast": "trl", "ours_qlora": "bitsandbytes"}


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


def gpu_tests() -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "",
         "tests/test_gpu.py", "tests/test_compile.py"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {"exit": done.returncode, "summary": summary, "seconds": time.perf_counter() - started}


def bench(model: str, batch: int, rows: list[str], steps: int) -> dict[str, Any]:
    """One `bench/dpo_vs_trl.py` run; its JSON report, or the error it ended with."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dpo_vs_trl.py"), "--device", "cuda", "--model",
         model, "--batch", str(batch), "--steps", str(steps), "--reps", "1", "--rows",
         ",".join(rows)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        return {"error": (done.stdout + done.stderr)[-3000:]}
    return json.loads((RESULTS / f"cuda-{model}.json").read_text())


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: shape, batch, setting, steady pairs/s, MFU, peak GB, against TRL."""
    lines = ["| model | pairs/step | setting | pairs/s | MFU | peak GB | x TRL fastest |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
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
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per bench row")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: make gpu-check needs a CUDA device (torch sees none)")
    started, skipped = time.perf_counter(), set()
    tests = gpu_tests()
    print(f"GPU tests: {tests['summary']} ({tests['seconds']:.0f} s)", flush=True)
    results = []
    for model, batch, rows in PLAN:
        result = bench(model, batch, runnable(rows, skipped), args.steps)
        results.append({"model": model, "batch": batch, **({"report": result}
                        if "error" not in result else result)})  # fmt: skip
        print(f"{model}, {batch} pairs/step: {'failed' if 'error' in result else 'done'} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    header = (f"commit {commit or 'unknown'}, {torch.cuda.get_device_name()}, torch "
              f"{torch.__version__} (CUDA {torch.version.cuda}), {args.steps} steps a row; "
              f"skipped: {', '.join(sorted(skipped)) or 'none'}; "
              f"GPU tests: {tests['summary']}")  # fmt: skip
    lines = [header, "", *table(results)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"header": header, "tests": tests, "results": results, "skipped": sorted(skipped),
              "seconds": time.perf_counter() - started}  # fmt: skip
    (RESULTS / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "gpu-check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {RESULTS / 'gpu-check.json'}, {RESULTS / 'gpu-check.md'}")


if __name__ == "__main__":
    main()
