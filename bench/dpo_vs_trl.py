"""Benchmark: this pipeline's DPO training against TRL's DPOTrainer on the same work.

    python bench/dpo_vs_trl.py [--steps 10] [--reps 3] [--batch 8] [--dvc-reps 3] [--dvc-only]
    python bench/dpo_vs_trl.py --device cuda --model qwen3-0.6b --steps 30 --reps 1 --dvc-reps 0

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
`--peak-tflops` otherwise). Also times a second `dvc exp run -S train.lr=...` of the demo
against the first (`--dvc-reps` pairs, each from a fresh copy; `--dvc-only` runs just that and
writes bench/results/dvc.json). Prints a table and writes bench/results/latest.json. TRL is a
benchmark-only dependency (`pip install -e .[reference]`); the pipeline never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VOCAB = 151_936
STEADY_FROM = 4  # steady-state figures count steps after this many
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's dense bf16 peak of the H100 SXM (H200: the same)
# Qwen3-0.6B's and a Qwen3-4B-shaped config, built here with random weights; "tiny" is the CPU
# benchmark model.
MODEL_SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rope_theta=1_000_000.0, rms_norm_eps=1e-6),
}  # fmt: skip
TEMPLATE = "Question: {question}\n\nAnswer:\n"  # ends on a newline: no token merges at the seam
MAX_LENGTH = 512
PIPELINE_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
TRL_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # DPOTrainer's tokenized columns


def make_assets(workdir: Path, n_pairs: int, seed: int = 0, model: str = "tiny") -> None:
    """A Qwen3 of shape `model` with the full vocabulary, the demo tokenizer, long text pairs."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from pipeline.demo.dataset import ensure_demo_dataset
    from pipeline.demo.model import ensure_demo_model

    cache = workdir / "cache"
    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(cache))
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        **MODEL_SHAPES[model],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    table = pq.read_table(ensure_demo_dataset(cache) / "data/rl").to_pylist()
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):  # long answers: several demo answers joined, 100-480 tokens
        rows = rng.sample(table, 12)
        target = rng.randint(100, 480)
        chosen = _grow(tokenizer, [r["response_j"] for r in rows], target)
        rejected = _grow(tokenizer, [r["response_k"] for r in rows], rng.randint(60, target))
        pairs.append(
            {
                "prompt": TEMPLATE.format(question=rows[0]["question"]),
                "chosen": chosen,
                "rejected": rejected,
            }
        )
    (workdir / "pairs.json").write_text(json.dumps(pairs))


def _grow(tokenizer, parts: list[str], target: int) -> str:
    text = parts[0]
    for part in parts[1:]:
        if len(tokenizer(text + "\n\n" + part)["input_ids"]) > target:
            break
        text = text + "\n\n" + part
    return text


def tokenized_rows(workdir: Path) -> list[dict[str, list[int]]]:
    """The pairs as this pipeline tokenizes them (prompt and completion apart, EOS appended)."""
    from transformers import AutoTokenizer

    from pipeline.data.tokenization import encode, encode_completion

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    return [
        {
            "prompt_input_ids": encode(tokenizer, p["prompt"]),
            "chosen_input_ids": encode_completion(tokenizer, p["chosen"]),
            "rejected_input_ids": encode_completion(tokenizer, p["rejected"]),
        }
        for p in json.loads((workdir / "pairs.json").read_text())
    ]


def run_ours(
    args: argparse.Namespace,
    cached: bool,
    checkpointing: bool = False,
    lora: bool = False,
    quantize: str = "none",
) -> dict:
    """The pipeline's trainer; `quantize="nf4"` (with `lora`) is QLoRA: policy and reference on
    the same 4-bit base, as the stages run it (CUDA and bitsandbytes only)."""
    import datasets
    import numpy as np

    from pipeline.model.loading import (
        enable_activation_checkpointing,
        freeze,
        load_causal_lm,
        resolve_runtime,
    )
    from pipeline.model.reference import CachedReference, ModelReference
    from pipeline.model.scoring import CompletionScorer, score_pairs
    from pipeline.params import LoraParams
    from pipeline.train.adapters import add_adapters
    from pipeline.train.loop import Resume, train_policy
    from tests.helpers import train_params

    workdir, steps, batch = args.workdir, args.steps, args.batch
    runtime = resolve_runtime(args.device)
    data = datasets.Dataset.from_list(tokenized_rows(workdir))
    policy = CompletionScorer(load_causal_lm(workdir / "model", runtime, False, quantize))
    if checkpointing:
        enable_activation_checkpointing(policy.model)
    if lora:  # the project's default adapters: r=16, alpha 32, every attention and MLP linear
        policy.model = add_adapters(policy.model, LoraParams(enabled=True))
    base = freeze(CompletionScorer(load_causal_lm(workdir / "model", runtime, False, quantize)))
    t0 = time.perf_counter()
    if cached:  # what the reference stage stores once per base model and data
        reference = CachedReference(
            np.stack(score_pairs(base, data, batch, runtime, 0, "ref"), 1), runtime.device
        )
        del base
    else:
        reference = ModelReference(base, runtime)
    setup = time.perf_counter() - t0
    params = train_params(
        lr=1e-4,
        batch_size=batch,
        max_steps=steps,
        cached_reference=cached,
        length_grouping=False,
        max_tokens_per_micro_batch=_default_token_budget(),
        gradient_checkpointing=checkpointing,
    )
    stamps = [_now()]
    result = train_policy(
        policy,
        reference,
        data,
        params,
        runtime,
        0,
        Resume(Path(tempfile.mkdtemp()), "bench"),
        on_log=lambda row: stamps.append(_now()),
    )
    losses = [row["loss"] for row in result.log]
    n_params = sum(p.numel() for p in policy.parameters())
    return _summary(losses, stamps, data, batch, n_params, args, setup)


def run_trl(args: argparse.Namespace, fast: bool = False) -> dict:
    """TRL's DPOTrainer: its defaults, or (`fast`) its fastest setting: reference log-probs
    precomputed before training and no gradient checkpointing."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pipeline.train.plan import epoch_order

    workdir, steps, batch = args.workdir, args.steps, args.batch
    pairs = datasets.Dataset.from_list(json.loads((workdir / "pairs.json").read_text()))
    order = epoch_order(len(pairs), 0, 0)  # the pipeline's epoch-0 order (seed 0), read in turn
    pairs = pairs.select(order.tolist())
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    losses: list[float] = []
    stamps: list[float] = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(_now())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(_now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    cuda = args.device == "cuda"
    speed = {"precompute_ref_log_probs": True, "gradient_checkpointing": False} if fast else {}
    config = DPOConfig(
        output_dir=str(Path(tempfile.mkdtemp())),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        max_length=MAX_LENGTH,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,  # autocast over fp32 master weights, as the pipeline runs on CUDA
        seed=0,
        dataloader_drop_last=False,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        **speed,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=pairs,
        processing_class=tokenizer,
        callbacks=[Record()],
    )
    _check_same_ids(trainer.train_dataset, workdir, order)
    trainer.train()
    n_params = sum(p.numel() for p in model.parameters())
    return _summary(losses, stamps, trainer.train_dataset, batch, n_params, args, 0.0, TRL_COLUMNS)


def _check_same_ids(trl_dataset, workdir: Path, order) -> None:
    ours = [tokenized_rows(workdir)[i] for i in order]
    for row, mine in zip(trl_dataset, ours, strict=True):
        same = (
            row["prompt_ids"] == mine["prompt_input_ids"]
            and row["chosen_ids"] == mine["chosen_input_ids"]
            and row["rejected_ids"] == mine["rejected_input_ids"]
        )
        if not same:
            raise SystemExit("TRL and the pipeline tokenized a pair differently: not the same work")


def _tokens(data, n: int, columns: tuple[str, str, str] = PIPELINE_COLUMNS) -> int:
    """Tokens in the first n pairs' forward passes: the prompt twice (chosen and rejected rows)."""
    rows = data[:n]
    prompts, chosen, rejected = (rows[c] for c in columns)
    return sum(
        2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)
    )


def _now() -> float:
    """Wall clock after the device has finished what was queued (CUDA runs asynchronously)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _default_token_budget() -> int:
    """train.max_tokens_per_micro_batch of params.yaml: the pipeline runs with its defaults."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    return int(params["train"]["max_tokens_per_micro_batch"])


def _summary(
    losses: list[float],
    stamps: list[float],
    data,
    batch: int,
    n_params: int,
    args: argparse.Namespace,
    setup: float,
    columns: tuple[str, str, str] = PIPELINE_COLUMNS,
) -> dict:
    """Whole-run and steady-state throughput, peak memory, MFU and losses of one run.

    `stamps` are the times before the first step and after each step; step k uses the pairs
    k * batch .. (k + 1) * batch - 1 of `data` (sequential order on both sides).
    """
    import torch

    steps = len(stamps) - 1
    first = min(STEADY_FROM, steps - 1)
    seconds, steady = stamps[-1] - stamps[0], stamps[-1] - stamps[first]
    tokens = _tokens(data, steps * batch, columns)
    steady_tokens = tokens - _tokens(data, first * batch, columns)
    cuda = args.device == "cuda"
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    peak_flops = _peak_tflops(args) * 1e12 if cuda else None
    return {
        "seconds": seconds,
        "pairs_per_s": steps * batch / seconds,
        "tokens_per_s": tokens / seconds,
        "steady_pairs_per_s": (steps - first) * batch / steady,
        "steady_tokens_per_s": steady_tokens / steady,
        "mfu": 6 * n_params * steady_tokens / steady / peak_flops if peak_flops else None,
        "peak_mb": peak_mb,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "setup_seconds": setup,
    }


def _peak_tflops(args: argparse.Namespace) -> float | None:
    """Dense bf16 peak of the device: `--peak-tflops`, or the H100/H200 figure by name."""
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return H100_BF16_DENSE_TFLOPS if ("H100" in name or "H200" in name) else None


# Rows of the table: what each worker process runs. CUDA adds checkpointing and TRL's fastest.
RUNS = {
    "ours": lambda args: run_ours(args, cached=True),
    "ours_live": lambda args: run_ours(args, cached=False),
    "ours_ckpt": lambda args: run_ours(args, cached=True, checkpointing=True),
    "ours_lora": lambda args: run_ours(args, cached=True, lora=True),
    "ours_qlora": lambda args: run_ours(args, cached=True, lora=True, quantize="nf4"),
    "trl": lambda args: run_trl(args),
    "trl_fast": lambda args: run_trl(args, fast=True),
}
ROW_NAMES = {
    "ours": "pipeline (defaults: cached reference)",
    "ours_live": "pipeline (reference on the fly)",
    "ours_ckpt": "pipeline + activation checkpointing",
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
        raise SystemExit(f"{kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def dvc_timing(workdir: Path, reps: int) -> dict:
    """Wall time of the demo DAG as a first experiment, then one that only changes train.lr.

    Each repetition starts from nothing, as a new user would: a fresh copy of the repository and
    an empty demo-asset cache. Medians over `reps`; the ratio is the median of per-pair ratios.
    """
    runs = [_dvc_pair(workdir / f"dvc-{i}") for i in range(reps)]
    return {**medians(runs), "runs": runs}


def medians(runs: list[dict]) -> dict:
    """Key by key median of repeated runs' figures (None where a figure does not apply)."""
    return {
        k: None if runs[0][k] is None else statistics.median(r[k] for r in runs) for k in runs[0]
    }


def _dvc_pair(folder: Path) -> dict:
    from tests.e2e import copy_repo, environment

    repo = copy_repo(folder / "repo")
    env = environment(folder / "cache")
    times = {}
    for name, extra in (("first", []), ("lr_only", ["-S", "train.lr=5e-4"])):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pipeline.demo", "--name", f"bench-{name}", *extra],
            cwd=repo,
            env=env,
            check=True,
            capture_output=True,
        )
        times[f"{name}_seconds"] = time.perf_counter() - t0
    times["ratio"] = times["lr_only_seconds"] / times["first_seconds"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODEL_SHAPES), default="tiny")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (CUDA)")
    parser.add_argument("--rows", help=f"comma-separated rows to run, of {','.join(RUNS)}")
    parser.add_argument("--dvc-reps", type=int, default=3, help="dvc exp run pairs timed (0: none)")
    parser.add_argument("--dvc-only", action="store_true", help="only the dvc exp run timing")
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dvc_only and args.dvc_reps < 1:
        parser.error("--dvc-only needs --dvc-reps of at least 1")
    if args.worker:
        return worker(args)
    workdir = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    if args.dvc_only:  # beside latest.json, which keeps the last complete run
        report = {"dvc_exp_run": dvc_timing(workdir, args.dvc_reps)}
        write_report(report, REPO / "bench" / "results" / "dvc.json")
        print_dvc(report["dvc_exp_run"])
        return None
    make_assets(workdir, args.steps * args.batch, model=args.model)
    runs: dict[str, list[dict]] = {kind: [] for kind in rows_for(args)}
    for _ in range(args.reps):
        for kind in runs:
            runs[kind].append(spawn(kind, workdir, args))
    table = {kind: medians(rs) for kind, rs in runs.items()}
    report = {"config": config(args), "median": table, "runs": runs, "ratios": ratios(table)}
    if args.dvc_reps:
        report["dvc_exp_run"] = dvc_timing(workdir, args.dvc_reps)
    name = "latest.json" if args.device == "cpu" else f"{args.device}-{args.model}.json"
    write_report(report, REPO / "bench" / "results" / name)
    print_table(report)


def config(args: argparse.Namespace) -> dict:
    """What was measured, on what, with which versions."""
    from importlib.metadata import version

    import torch

    return {
        "steps": args.steps,
        "steady_from_step": STEADY_FROM + 1,
        "reps": args.reps,
        "batch": args.batch,
        "model": args.model,
        "vocab": VOCAB,
        "max_length": MAX_LENGTH,
        "max_tokens_per_micro_batch": _default_token_budget(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "peak_tflops_bf16": _peak_tflops(args) if args.device == "cuda" else None,
        "mfu_formula": "6 x parameters x steady tokens/s / peak dense bf16 FLOP/s",
        "versions": {p: version(p) for p in ("torch", "transformers", "trl")},
        "cuda": torch.version.cuda,
    }


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
    print(f"{report['config']['device']}, {report['config']['model']}, batch "
          f"{report['config']['batch']}")  # fmt: skip
    print(f"{'':40}" + "".join(f"{c:>11}" for c in columns))
    for kind, row in report["median"].items():
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(
            f"{ROW_NAMES[kind]:40}{row['pairs_per_s']:11.2f}{row['steady_pairs_per_s']:11.2f}"
            f"{row['steady_tokens_per_s']:11.0f}{mfu:>11}{row['peak_mb']:11.0f}"
            f"{row['loss_first']:11.4f}{row['loss_last']:11.4f}"
        )
    for key, value in report["ratios"].items():
        print(f"{key}: {value:.3f}")
    if "dvc_exp_run" in report:
        print_dvc(report["dvc_exp_run"])


def print_dvc(d: dict) -> None:
    print(
        f"dvc exp run (median of {len(d['runs'])}): first {d['first_seconds']:.1f} s, "
        f"lr-only {d['lr_only_seconds']:.1f} s, ratio {d['ratio']:.2f} "
        f"(each: {', '.join(format(r['ratio'], '.2f') for r in d['runs'])})"
    )


if __name__ == "__main__":
    main()
