"""The data stages at scale: wall time, pairs/s and peak RSS of download_data, subsample and
tokenize on a generated dataset in the hub layout, at two fractions; beside them, the same
subsample and tokenize run by another revision of this repository (default: the last one before
the stages streamed their input) and a `datasets.map` that tokenizes one text per call, as TRL's DPO
preprocessing does.

    python bench/data_scale.py --pairs 100000             # ~15 min on 2 CPU cores
    python bench/data_scale.py --pairs 20000 --fractions 0.5 1.0 --budget 16
    python bench/data_scale.py --pairs 100000 --tokenizer /path/to/Qwen3-0.6B
    python bench/data_scale.py --pairs 100000 --max-length 96      # most answers cut
    python bench/data_scale.py --pairs 2000000 --fractions 0.1 1.0 --before none --no-baseline
    python bench/data_scale.py --pairs 400000 --format conversational --before none --no-baseline

Pairs are the demo generator's (seeded; answers of 20-110 words), in stack-exchange-paired's
columns or, with `--format`, rewritten shard by shard as TRL's conversational pairs (message
lists, implicit prompt, parquet) or HH-rlhf transcripts (jsonl); another revision reads only the
first. `--budget` sets
tokenize.max_prompt_length: the demo's 64 leaves a few prompts over budget, 16 nearly all of
them. `--max-length` sets tokenize.max_length: at 96 most answers run past the room their
prompt leaves, as long real answers do at 512. `--tokenizer` tokenizes with another tokenizer
folder (a real model's: Qwen3's 151k-token vocabulary encodes differently from the demo's 2k);
`--before none` skips the other revision (it held a split in memory: at 2 million pairs it needs
more than this machine's 24 GB).
Peak RSS is the largest of a stage's processes (its tokenize workers included).
Writes bench/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import figures  # noqa: E402
import yaml
from scale_data import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEFORE_STREAMING = "1a1662e"  # the last commit whose data stages held a split in memory
FORMATS = ("stack-exchange", "conversational", "hh")


def in_child(*args: str) -> Any:
    """This script's `args` subcommand in a child process -> the JSON it prints. The bench
    process stays small: Linux counts the pages a forked child starts with into its peak RSS."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_params(source: Path, target: Path, overrides: dict[str, Any]) -> None:
    """`source` params.yaml with dotted-key overrides, written to `target`."""
    tree = yaml.safe_load(source.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = tree
        for part in path:
            node = node[part]
        node[name] = value
    target.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")


def run_stage(code: Path, work: Path, stage: str) -> dict[str, float]:
    """`python -m stages.<stage>` of the checkout `code` in `work` -> seconds, peak RSS (MB)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with open(work / f"{stage}.log", "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{stage} failed in {work}: see {work / f'{stage}.log'}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def per_text_map(work: Path, budget: int) -> dict[str, float]:
    """The baseline: datasets.map over the subsampled train pairs, one tokenizer call per text
    (prompt, chosen, rejected), as TRL's DPO preprocessing tokenizes."""
    import datasets
    from transformers import AutoTokenizer

    params = yaml.safe_load((work / "params.yaml").read_text())["tokenize"]
    tokenizer = AutoTokenizer.from_pretrained(work / "models" / "base")
    source = str(work / "data" / "subsampled" / "train" / "data.parquet")
    with tempfile.TemporaryDirectory() as cache:
        pairs = datasets.Dataset.from_parquet(source, cache_dir=cache)

        def one(row: dict[str, Any]) -> dict[str, Any]:
            prompt = params["template"].replace("{question}", row["question"] or "")
            encoded = [
                tokenizer(t or "", add_special_tokens=False)["input_ids"]
                for t in (prompt, row["chosen"], row["rejected"])
            ]
            return {
                "prompt_ids": encoded[0][-budget:],
                "chosen_ids": encoded[1],
                "rejected_ids": encoded[2],
            }

        started = time.perf_counter()
        pairs.map(one, num_proc=params["num_proc"], remove_columns=pairs.column_names)
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "pairs_per_s": round(len(pairs) / seconds, 1)}


def pairs_per_s(work: Path) -> float:
    return json.loads((work / "reports" / "tokenize.json").read_text())["train"]["pairs_per_s"]


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def use_tokenizer(model_dir: Path, tokenizer: Path | None) -> None:
    """Replace the base model folder's tokenizer files with those of `tokenizer` (None: keep)."""
    if tokenizer is None:
        return
    for name in TOKENIZER_FILES:
        (model_dir / name).unlink(missing_ok=True)
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, model_dir / name)


def measure(
    dataset: Path, fraction: float, args: argparse.Namespace, top: Path, old: Path | None
) -> dict[str, Any]:
    """The three stages at one fraction, then the old revision's stages and the baseline."""
    from demo.experiment import demo_overrides

    work = top / f"fraction-{fraction}"
    work.mkdir()
    shard = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["tokenize"]
    overrides = {
        **demo_overrides(REPO / "demo" / "params.yaml"),
        # params.yaml's shard size, not the demo's (sized for its few thousand pairs)
        "tokenize.pairs_per_shard": shard["pairs_per_shard"],
        "data.dataset": str(dataset),
        "data.fraction": fraction,
        "tokenize.max_prompt_length": args.budget,
        "tokenize.max_length": args.max_length,
    }
    write_params(REPO / "params.yaml", work / "params.yaml", overrides)
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")  # the stages read their params list there
    row: dict[str, Any] = {"fraction": fraction}
    for stage in ("download_model", "download_data", "subsample", "tokenize"):
        if stage == "tokenize":
            use_tokenizer(work / "models" / "base", args.tokenizer)
        row[stage] = run_stage(REPO, work, stage)
    row["pairs"] = json.loads((work / "reports" / "subsample.json").read_text())["train"]
    row["tokenize"]["pairs_per_s"] = pairs_per_s(work)
    if args.baseline:
        row["per_text_map"] = in_child("per-text", str(work), str(args.budget))
    if old is None:
        return row
    before = top / f"before-{fraction}"
    before.mkdir()
    for folder in ("models", "data/raw"):
        shutil.copytree(work / folder, before / folder)
    write_params(old / "params.yaml", before / "params.yaml", overrides)
    shutil.copy(old / "dvc.yaml", before / "dvc.yaml")
    row["subsample_before"] = run_stage(old, before, "subsample")
    row["tokenize_before"] = {
        **run_stage(old, before, "tokenize"),
        "pairs_per_s": pairs_per_s(before),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="train pairs to generate")
    parser.add_argument("--fractions", type=float, nargs=2, default=[0.25, 1.0])
    parser.add_argument("--budget", type=int, default=64, help="tokenize.max_prompt_length")
    parser.add_argument(
        "--max-length",
        type=int,
        default=192,
        help="tokenize.max_length (the demo's: answers kept whole)",
    )
    parser.add_argument(
        "--before", default=BEFORE_STREAMING, help="revision to compare with ('none': skip it)"
    )
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the demo's)")
    parser.add_argument(
        "--format", default="stack-exchange", choices=FORMATS, help="the generated pairs' format"
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the one-text-per-call map",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="add the full-fraction row to docs/figures.jsonl and its table",
    )
    if sys.argv[1:2] == ["generate"]:
        generate(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return print("{}")
    if sys.argv[1:2] == ["per-text"]:
        return print(json.dumps(per_text_map(Path(sys.argv[2]), int(sys.argv[3]))))
    args = parser.parse_args()
    if args.format != "stack-exchange":
        args.before = "none"  # an older revision reads stack-exchange-paired's columns only
    with tempfile.TemporaryDirectory(prefix="data-scale-") as scratch:
        top = Path(scratch)
        old = None if args.before == "none" else top / "before-code"
        worktree = ["git", "-C", str(REPO), "worktree"]
        if old is not None:
            subprocess.run([*worktree, "add", "-q", "--detach", str(old), args.before], check=True)
        try:
            dataset = top / "dataset"
            in_child("generate", str(dataset), str(args.pairs), args.format)
            rows = [measure(dataset, f, args, top, old) for f in args.fractions]
        finally:
            if old is not None:
                subprocess.run([*worktree, "remove", "--force", str(old)])
    report(rows, args)
    if args.record:
        last = rows[-1]
        stages = ("download_data", "subsample", "tokenize")
        figures.record(
            f"the data stages on {last['pairs']:,} pairs ({args.format}): seconds, peak RSS",
            ", ".join(
                f"{stage} {last[stage]['seconds']:.1f} s, {last[stage]['peak_rss_mb']:.0f} MB"
                for stage in stages
            ),
            "python bench/data_scale.py " + " ".join(sys.argv[1:]),
        )
        figures.main([])


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"{args.pairs} generated pairs ({args.format}), tokenize.max_prompt_length "
        f"{args.budget}, max_length {args.max_length}"
    )
    print(
        f"{'fraction':>8} {'pairs':>7} {'stage':<16} {'seconds':>8} {'pairs/s':>8} {'peak MB':>8}"
    )
    for row in rows:
        stages = (
            "download_data",
            "subsample",
            "subsample_before",
            "tokenize",
            "tokenize_before",
            "per_text_map",
        )
        for stage in (s for s in stages if s in row):
            measured = row[stage]
            rate = measured.get("pairs_per_s") or row["pairs"] / measured["seconds"]
            print(
                f"{row['fraction']:>8} {row['pairs']:>7} {stage:<16} {measured['seconds']:>8.1f} "
                f"{rate:>8.0f} {measured.get('peak_rss_mb', float('nan')):>8.0f}"
            )
    out = REPO / "bench" / "results" / "data_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
