"""Sweep timing on the offline demo: three queued lr experiments run with `dvc queue start -j 1`
and with `-j 2`, each in a fresh copy of the repository whose data stages were cached by one
earlier demo run (not timed). Prints the wall time per worker count, the ratio, and each
experiment's training throughput; writes bench/results/sweep.json.

    python bench/sweep.py                # ~8 min on 2 CPU cores
    python bench/sweep.py --jobs 1 2 4   # other worker counts
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e import copy_repo, environment, run  # noqa: E402
from tests.test_sweep import DVC, run_queue  # noqa: E402

LRS = ("3e-4", "6e-4", "9e-4")


def time_sweep(folder: Path, jobs: int, asset_cache: Path) -> dict:
    """One fresh copy: a demo run to cache the data stages, then the timed queued sweep."""
    repo = copy_repo(folder / f"j{jobs}")
    env = environment(asset_cache)
    demo = (sys.executable, "-m", "pipeline.demo")
    run(repo, env, *demo, "--name", "base")
    for lr in LRS:
        run(repo, env, *demo, "--queue", "-S", f"train.lr={lr}", "--name", f"lr-{lr}")
    started = time.monotonic()
    status = run_queue(repo, env, [*DVC, "queue", "start", "-j", str(jobs)])
    seconds = time.monotonic() - started
    if status.count("Success") != len(LRS):
        raise SystemExit(f"-j {jobs}: not every experiment succeeded:\n{status}")
    return {"jobs": jobs, "seconds": round(seconds, 1), "pairs_per_s": train_throughput(repo)}


def train_throughput(repo: Path) -> dict[str, float]:
    """Each swept experiment's training pairs/s (its MLflow run's summary)."""
    from mlflow import MlflowClient

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name("qwen3-dpo")
    return {
        r.data.tags["dvc_exp_name"]: round(r.data.metrics["train_summary/pairs_per_s"], 2)
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags["dvc_exp_name"] != "base"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = [time_sweep(folder, jobs, folder / "assets") for jobs in args.jobs]
    serial = results[0]["seconds"]
    print(f"{len(LRS)} queued demo experiments (lr {', '.join(LRS)}), data stages cached")
    print(f"{'workers':>8} {'seconds':>8} {'vs first':>9}  train pairs/s per experiment")
    for row in results:
        ratio = row["seconds"] / serial
        print(f"{row['jobs']:>8} {row['seconds']:>8.1f} {ratio:>8.2f}x  {row['pairs_per_s']}")
    out = REPO / "bench" / "results" / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
