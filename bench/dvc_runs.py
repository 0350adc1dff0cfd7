"""DVC experiment timings on the offline demo, each in a fresh clone of this repository (its
committed state, so commit first) with an empty demo-asset cache, as a new user starts.

    python bench/dvc_runs.py first [--reps 3]   # ~6 min a repetition on 2 CPU cores
    python bench/dvc_runs.py sweep [--jobs 1 2] # ~8 min on 2 CPU cores

`first`: the demo DAG as a first experiment, then one that changes only train.lr (its data
stages and reference come from DVC's cache); medians over `--reps`, and the ratio. `sweep`:
three queued lr experiments run by `dvc queue start -j N` for each N, in a clone whose data
stages one earlier demo run cached (not timed); the wall time per N, the ratio to the first, and
each experiment's training throughput from its MLflow run. Writes bench/results/<command>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DVC = (sys.executable, "-m", "dvc")
DEMO = (sys.executable, "-m", "demo")
LRS = ("3e-4", "6e-4", "9e-4")


def fresh_clone(folder: Path) -> tuple[Path, dict[str, str]]:
    """A clone of the repository and the environment a new user's shell would give the demo:
    this venv first on PATH, an empty asset cache, no network, no MLflow or DVC settings."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(folder / "repo")], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DPO_QWEN3_CACHE=str(folder / "cache"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return folder / "repo", env


def timed(repo: Path, env: dict[str, str], *cmd: str) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def first_then_lr(folder: Path) -> dict[str, float]:
    repo, env = fresh_clone(folder)
    first = timed(repo, env, *DEMO, "--name", "bench-first")
    lr_only = timed(repo, env, *DEMO, "--name", "bench-lr", "-S", "train.lr=5e-4")
    return {"first_seconds": first, "lr_only_seconds": lr_only, "ratio": lr_only / first}


def sweep(folder: Path, jobs: int) -> dict:
    repo, env = fresh_clone(folder)
    timed(repo, env, *DEMO, "--name", "base")  # caches the data stages: not part of the sweep
    for lr in LRS:
        timed(repo, env, *DEMO, "--queue", "-S", f"train.lr={lr}", "--name", f"lr-{lr}")
    started = time.perf_counter()
    # The workers inherit stdout: with a pipe, waiting for the command would wait for them too.
    subprocess.run(
        [*DVC, "queue", "start", "-j", str(jobs)],
        cwd=repo,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    status = ""
    while "0 active, 0 idle" not in status or " Queued" in status or " Running" in status:
        time.sleep(2)
        status = subprocess.run(
            [*DVC, "queue", "status"], cwd=repo, env=env, check=True, capture_output=True, text=True
        ).stdout
    seconds = time.perf_counter() - started
    if status.count("Success") != len(LRS):
        raise SystemExit(f"-j {jobs}: not every experiment succeeded:\n{status}")
    return {"jobs": jobs, "seconds": round(seconds, 1), "pairs_per_s": throughput(repo)}


def throughput(repo: Path) -> dict[str, float]:
    """Each swept experiment's training pairs/s (its MLflow run's summary)."""
    from mlflow import MlflowClient

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name("qwen3-dpo").experiment_id
    return {
        r.data.tags["dvc_exp_name"]: round(r.data.metrics["train_summary/pairs_per_s"], 2)
        for r in client.search_runs([experiment])
        if r.data.tags["dvc_exp_name"] != "base"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["first", "sweep"])
    parser.add_argument("--reps", type=int, default=3, help="first: repetitions")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="sweep: workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.command == "first":
            runs = [first_then_lr(Path(tmp) / f"rep-{i}") for i in range(args.reps)]
            result = {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": runs}
            print(
                f"first {result['first_seconds']:.1f} s, lr-only {result['lr_only_seconds']:.1f}"
                f" s, ratio {result['ratio']:.2f} (median of {args.reps})"
            )
        else:
            result = [sweep(Path(tmp) / f"j{jobs}", jobs) for jobs in args.jobs]
            print(f"{len(LRS)} queued demo experiments (lr {', '.join(LRS)}), data stages cached")
            print(f"{'workers':>8} {'seconds':>8} {'vs first':>9}  train pairs/s per experiment")
            for row in result:
                ratio = row["seconds"] / result[0]["seconds"]
                print(
                    f"{row['jobs']:>8} {row['seconds']:>8.1f} {ratio:>8.2f}x  {row['pairs_per_s']}"
                )
    out = REPO / "bench" / "results" / f"{args.command}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
