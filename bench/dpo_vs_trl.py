"""Benchmark: this pipeline's DPO training against TRL's DPOTrainer on the same work.

    python bench/dpo_vs_trl.py [--steps 10] [--reps 3] [--batch 8]
    python bench/dpo_vs_trl.py --device cuda --model qwen3-0.6b --steps 30 --reps 1

CPU (default): a tiny Qwen3 (2 layers, 128 wide) with the real Qwen3 vocabulary (151,936), fp32.
CUDA: `--model qwen3-0.6b` builds random weights with Qwen3-0.6B's exact config locally (no
download), fp32 master weights + bf16 autocast on both sides; rows for the pipeline's defaults
(cached reference), the reference on the fly, activation checkpointing, LoRA r=16, QLoRA (nf4
base: needs bitsandbytes, the `qlora` extra), TRL's defaults and TRL's fastest setting
(`precompute_ref_log_probs`, no gradient checkpointing). Same pairs (identical
token ids, checked), batch, sequence lengths, steps and optimizer everywhere. Every run is a
fresh process (so peak memory is its own: process RSS on CPU, `torch.cuda.max_memory_allocated`
on CUDA); figures are medians over `--reps` alternating repetitions. Steady-state pairs/s,
tokens/s and MFU leave out the first `STEADY_FROM` steps (warm-up, allocator growth).
MFU = 6 x parameters x tokens/s / the device's dense bf16 peak (989 TFLOP/s on an H100 or H200,
`--peak-tflops` otherwise). The pipeline rows run what the train stage runs: a workspace laid
out as the stages leave it (models/base, data/tokenized/train, the reference stage's cache),
params.yaml with the row's overrides, the stage's own `setup.load_policy` / `setup.load_reference`
(packing and attention as the stage picks them) and `DPORecipe`. Prints a table and writes
bench/results/latest.json. TRL is a benchmark-only dependency (`pip install -e .[reference]`);
the pipeline never imports it. DVC experiment timings: bench/dvc_runs.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import figures  # noqa: E402
from measure import (  # noqa: E402
    STEADY_FROM,
    installed_version,
    peak_tflops,
)
from sides import run_ours, run_trl  # noqa: E402
from workload import MAX_LENGTH, MODEL_SHAPES, VOCAB, make_workspace  # noqa: E402

RUNS = {
    "ours": lambda args: run_ours(args),
    "ours_live": lambda args: run_ours(args, cached_reference=False),
    "ours_ckpt": lambda args: run_ours(args, gradient_checkpointing=True),
    "ours_compile": lambda args: run_ours(args, compile="layers", pad_to_multiple_of=64),
    "ours_lora": lambda args: run_ours(args, lora=True),
    "ours_qlora": lambda args: run_ours(args, lora=True, quantize="nf4"),
    "trl": lambda args: run_trl(args),
    "trl_fast": lambda args: run_trl(args, fast=True),
}
ROW_NAMES = {
    "ours": "pipeline (defaults: cached reference)",
    "ours_live": "pipeline (reference on the fly)",
    "ours_ckpt": "pipeline + activation checkpointing",
    "ours_compile": "pipeline + compiled layers, padding to 64",
    "ours_lora": "pipeline, LoRA r=16 (cached reference)",
    "ours_qlora": "pipeline, QLoRA nf4 r=16 (cached reference)",
    "trl": "TRL DPOTrainer (defaults)",
    "trl_fast": "TRL (precomputed reference, no ckpt)",
}


def rows_for(args: argparse.Namespace) -> list[str]:
    """`--rows`, else every row on CUDA and the three CPU rows on the CPU."""
    if args.rows:
        return args.rows.split(",")
    return list(RUNS) if args.device == "cuda" else ["ours", "ours_live", "trl"]


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print("RESULT " + json.dumps(RUNS[args.worker](args)))


class RowFailed(Exception):
    """A row's process ended without a result; the message holds the end of its output."""


def spawn(kind: str, workdir: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--workdir",
        str(workdir),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RowFailed(f"{kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def medians(runs: list[dict]) -> dict:
    """Key by key median of repeated runs' figures (None where a figure does not apply)."""
    return {
        k: None if runs[0][k] is None else statistics.median(r[k] for r in runs) for k in runs[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model",
        type=model_arg,
        default="tiny",
        help=f"a shape with random weights ({', '.join(MODEL_SHAPES)}) or a local model folder",
    )
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (CUDA)")
    parser.add_argument("--rows", help=f"comma-separated rows to run, of {','.join(RUNS)}")
    parser.add_argument("--out", type=Path, help="the JSON report (default: bench/results/)")
    parser.add_argument(
        "--keep-going", action="store_true", help="report a failed row's error; run the others"
    )
    parser.add_argument(
        "--record", action="store_true", help="add the ratios to docs/figures.jsonl and its table"
    )
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    workdir = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    make_workspace(workdir, args.steps * args.batch, model=args.model)
    runs, failed = run_rows(args, workdir)
    table = {kind: medians(rs) for kind, rs in runs.items() if kind not in failed}
    report = {
        "config": config(args),
        "median": table,
        "runs": runs,
        "ratios": ratios(table),
        "failed": failed,
    }
    model = args.model if args.model in MODEL_SHAPES else Path(args.model).name.lower()
    default = args.device == "cpu" and args.model == "tiny"
    name = "latest.json" if default else f"{args.device}-{model}.json"
    write_report(report, args.out or REPO / "bench" / "results" / name)
    print_table(report)
    if args.record and report["ratios"]:
        figures.record(
            f"training against TRL ({args.device}, model {model}, batch {args.batch})",
            ", ".join(f"{key} {value:.2f}" for key, value in report["ratios"].items()),
            "python bench/dpo_vs_trl.py " + " ".join(sys.argv[1:]),
        )
        figures.main([])


def run_rows(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, list[dict]], dict]:
    """Every row's repetitions, alternating, each in a fresh process; with --keep-going a row
    that fails is left out of the next repetitions and its error kept, else it ends the run."""
    runs: dict[str, list[dict]] = {kind: [] for kind in rows_for(args)}
    failed: dict[str, str] = {}
    for _ in range(args.reps):
        for kind in (k for k in runs if k not in failed):
            try:
                runs[kind].append(spawn(kind, workdir, args))
            except RowFailed as error:
                if not args.keep_going:
                    raise SystemExit(str(error)) from None
                failed[kind] = str(error)[-3000:]
                print(f"{kind} failed; going on (--keep-going)", flush=True)
    return runs, failed


def config(args: argparse.Namespace) -> dict:
    """What was measured, on what, with which versions."""
    import torch

    from pipeline.params import load_params

    train = load_params(REPO / "params.yaml").train
    return {
        "steps": args.steps,
        "steady_from_step": STEADY_FROM + 1,
        "reps": args.reps,
        "batch": args.batch,
        "model": args.model,
        "vocab": vocab_of(args),
        "max_length": MAX_LENGTH,
        "max_tokens_per_micro_batch": train.max_tokens_per_micro_batch,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "peak_tflops_bf16": peak_tflops(args) if args.device == "cuda" else None,
        "mfu_formula": "6 x parameters x steady tokens/s / peak dense bf16 FLOP/s",
        "versions": {
            p: installed_version(p)
            for p in ("torch", "transformers", "trl", "peft", "bitsandbytes")
        },
        "cuda": torch.version.cuda,
    }


def model_arg(value: str) -> str:
    """--model: a name of MODEL_SHAPES, or an existing folder with a config.json."""
    if value in MODEL_SHAPES or (Path(value) / "config.json").is_file():
        return value if value in MODEL_SHAPES else str(Path(value).resolve())
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither a shape ({', '.join(MODEL_SHAPES)}) nor a model folder"
    )


def vocab_of(args: argparse.Namespace) -> int:
    if args.model in MODEL_SHAPES:
        return VOCAB
    return json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]


def ratios(table: dict[str, dict]) -> dict[str, float]:
    """Each pipeline row against each TRL row: steady pairs/s and peak memory; final losses."""
    out = {}
    for ours in (k for k in table if k.startswith("ours")):
        for trl in (k for k in table if k.startswith("trl")):
            out[f"pairs_per_s {ours} / {trl}"] = (
                table[ours]["steady_pairs_per_s"] / table[trl]["steady_pairs_per_s"]
            )
            out[f"peak_mb {ours} / {trl}"] = table[ours]["peak_mb"] / table[trl]["peak_mb"]
    if "ours" in table and "trl" in table:
        out["final_loss_rel_diff ours / trl"] = (
            abs(table["ours"]["loss_last"] - table["trl"]["loss_last"]) / table["trl"]["loss_last"]
        )
    if "ours" in table and "ours_lora" in table:  # the LoRA target: <= 0.5x at the same batch
        out["peak_mb ours_lora / ours"] = table["ours_lora"]["peak_mb"] / table["ours"]["peak_mb"]
    return out


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


def print_table(report: dict) -> None:
    columns = ("pairs/s", "steady/s", "tokens/s", "MFU", "peak MB", "loss 1", "final loss")
    print(
        f"{report['config']['device']}, {report['config']['model']}, batch "
        f"{report['config']['batch']}"
    )
    print(f"{'':40}" + "".join(f"{c:>11}" for c in columns))
    for kind, row in report["median"].items():
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(
            f"{ROW_NAMES[kind]:40}{row['pairs_per_s']:11.2f}{row['steady_pairs_per_s']:11.2f}"
            f"{row['steady_tokens_per_s']:11.0f}{mfu:>11}{row['peak_mb']:11.0f}"
            f"{row['loss_first']:11.4f}{row['loss_last']:11.4f}"
        )
    for kind in report.get("failed", {}):
        print(f"{ROW_NAMES[kind]:40}{'failed: see the JSON':>22}")
    for key, value in report["ratios"].items():
        print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
