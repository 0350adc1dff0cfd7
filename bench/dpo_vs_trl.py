"""Benchmark: this pipeline's DPO training against TRL's DPOTrainer on the same work.

    python bench/dpo_vs_trl.py [--steps 10] [--reps 3] [--batch 8] [--dvc-reps 3] [--dvc-only]

Same tiny Qwen3 architecture (2 layers, 128 wide) with the real Qwen3 vocabulary (151,936), same
pairs (identical token ids, checked), batch, sequence lengths, steps, optimizer and fp32 on CPU.
Every run is a fresh process (so peak resident memory is its own); figures are medians over
`--reps` alternating repetitions. Also times a second `dvc exp run -S train.lr=...` of the demo
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
TEMPLATE = "Question: {question}\n\nAnswer:\n"  # ends on a newline: no token merges at the seam
MAX_LENGTH = 512
PIPELINE_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
TRL_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # DPOTrainer's tokenized columns


def make_assets(workdir: Path, n_pairs: int, seed: int = 0) -> None:
    """Tiny Qwen3 with the full vocabulary, the demo tokenizer, and long text pairs."""
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
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
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


def run_ours(workdir: Path, steps: int, batch: int, cached: bool) -> dict:
    import datasets
    import numpy as np

    from pipeline.model.loading import freeze, load_causal_lm, resolve_runtime
    from pipeline.model.reference import CachedReference, ModelReference
    from pipeline.model.scoring import CompletionScorer, score_pairs
    from pipeline.train.loop import Resume, train_policy
    from tests.helpers import train_params

    runtime = resolve_runtime("cpu")
    data = datasets.Dataset.from_list(tokenized_rows(workdir))
    policy = CompletionScorer(load_causal_lm(workdir / "model", runtime, False))
    base = freeze(CompletionScorer(load_causal_lm(workdir / "model", runtime, False)))
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
    )
    t0 = time.perf_counter()
    result = train_policy(
        policy, reference, data, params, runtime, 0, Resume(Path(tempfile.mkdtemp()), "bench")
    )
    seconds = time.perf_counter() - t0
    losses = [row["loss"] for row in result.log]
    return _summary(losses, seconds, steps * batch, _tokens(data, steps * batch), setup)


def run_trl(workdir: Path, steps: int, batch: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pipeline.train.plan import epoch_order

    pairs = datasets.Dataset.from_list(json.loads((workdir / "pairs.json").read_text()))
    order = epoch_order(len(pairs), 0, 0)  # the pipeline's epoch-0 order (seed 0), read in turn
    pairs = pairs.select(order.tolist())
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    losses: list[float] = []
    times: list[float] = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not times:
                times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

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
        use_cpu=True,
        seed=0,
        dataloader_drop_last=False,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
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
    seconds = time.perf_counter() - times[0]
    return _summary(
        losses, seconds, steps * batch, _tokens(trainer.train_dataset, steps * batch, TRL_COLUMNS)
    )


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


def _summary(
    losses: list[float], seconds: float, pairs: int, tokens: int, setup: float = 0.0
) -> dict:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": peak_kb / 1024,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "setup_seconds": setup,
    }


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker == "trl":
        out = run_trl(args.workdir, args.steps, args.batch)
    else:
        out = run_ours(args.workdir, args.steps, args.batch, cached=args.worker == "ours")
    print("RESULT " + json.dumps(out))


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
    """Key by key median of repeated runs' figures."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


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
    parser.add_argument("--dvc-reps", type=int, default=3, help="dvc exp run pairs timed (0: none)")
    parser.add_argument("--dvc-only", action="store_true", help="only the dvc exp run timing")
    parser.add_argument("--worker", choices=["ours", "ours_live", "trl"], help=argparse.SUPPRESS)
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
    make_assets(workdir, args.steps * args.batch)
    runs: dict[str, list[dict]] = {"ours": [], "ours_live": [], "trl": []}
    for _ in range(args.reps):
        for kind in runs:
            runs[kind].append(spawn(kind, workdir, args))
    table = {kind: medians(rs) for kind, rs in runs.items()}
    report = {
        "config": {
            "steps": args.steps,
            "reps": args.reps,
            "batch": args.batch,
            "vocab": VOCAB,
            "max_length": MAX_LENGTH,
        },
        "median": table,
        "runs": runs,
    }
    report["ratios"] = {
        "pairs_per_s_ours_vs_trl": table["ours"]["pairs_per_s"] / table["trl"]["pairs_per_s"],
        "pairs_per_s_ours_live_vs_trl": table["ours_live"]["pairs_per_s"]
        / table["trl"]["pairs_per_s"],
        "peak_rss_ours_vs_trl": table["ours"]["peak_rss_mb"] / table["trl"]["peak_rss_mb"],
        "final_loss_rel_diff": abs(table["ours"]["loss_last"] - table["trl"]["loss_last"])
        / table["trl"]["loss_last"],
    }
    if args.dvc_reps:
        report["dvc_exp_run"] = dvc_timing(workdir, args.dvc_reps)
    write_report(report, REPO / "bench" / "results" / "latest.json")
    print_table(report)


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


def print_table(report: dict) -> None:
    names = {
        "ours": "pipeline (cached reference)",
        "ours_live": "pipeline (reference on the fly)",
        "trl": "TRL DPOTrainer",
    }
    columns = ("pairs/s", "tokens/s", "peak RSS MB", "loss step 1", "final loss")
    print(f"{'':34}" + "".join(f"{c:>13}" for c in columns))
    for kind, row in report["median"].items():
        print(
            f"{names[kind]:34}{row['pairs_per_s']:13.2f}{row['tokens_per_s']:13.0f}"
            f"{row['peak_rss_mb']:13.0f}{row['loss_first']:13.4f}{row['loss_last']:13.4f}"
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
