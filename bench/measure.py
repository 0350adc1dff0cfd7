"""What a benchmark run measured: wall-clock stamps around each step turned into throughput
(whole run and steady state), peak memory, MFU and the first and last losses."""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

STEADY_FROM = 4  # steady-state figures count steps after this many
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's dense bf16 peak of the H100 SXM (H200: the same)
PIPELINE_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
TRL_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # DPOTrainer's tokenized columns


def forward_tokens(data, n: int, columns: tuple[str, str, str] = PIPELINE_COLUMNS) -> int:
    """Tokens in the first n pairs' forward passes: the prompt twice (chosen and rejected rows)."""
    rows = data[:n]
    prompts, chosen, rejected = (rows[c] for c in columns)
    return sum(
        2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)
    )


def installed_version(package: str) -> str | None:
    """The installed version of `package`, None when it is not installed (TRL and bitsandbytes
    are optional: the rows that need them are left out without them)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def now() -> float:
    """Wall clock after the device has finished what was queued (CUDA runs asynchronously)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def summary(
    losses: list[float],
    stamps: list[float],
    data: Any,
    n_params: int,
    args: argparse.Namespace,
    setup: float,
    columns: tuple = PIPELINE_COLUMNS,
) -> dict:
    """Whole-run and steady-state throughput, peak memory, MFU and losses of one run.

    `stamps` are the times before the first step and after each step; step k uses the pairs
    k * batch .. (k + 1) * batch - 1 of `data` (sequential order on both sides), batch being
    `args.batch`.
    """
    batch = args.batch
    import torch

    steps = len(stamps) - 1
    first = min(STEADY_FROM, steps - 1)
    seconds, steady = stamps[-1] - stamps[0], stamps[-1] - stamps[first]
    tokens = forward_tokens(data, steps * batch, columns)
    steady_tokens = tokens - forward_tokens(data, first * batch, columns)
    cuda = args.device == "cuda"
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    peak_flops = peak_tflops(args) * 1e12 if cuda else None
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


def peak_tflops(args: argparse.Namespace) -> float | None:
    """Dense bf16 peak of the device: `--peak-tflops`, or the H100/H200 figure by name."""
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return H100_BF16_DENSE_TFLOPS if ("H100" in name or "H200" in name) else None


# Rows of the table: what each worker process runs. CUDA adds checkpointing and TRL's fastest.
