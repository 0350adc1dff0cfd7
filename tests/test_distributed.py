"""torchrun with 2 CPU processes (gloo), DDP or FSDP2, with or without LoRA adapters, takes the
same steps as 1 process with the same global batch: per-step loss and gradient norm agree to 1e-5
(1e-4 for DDP with compiled layers against the eager process);
the checkpoint it writes (full states gathered from the shards) resumes to the same weights, and
with adapters the saved adapter and merged model equal the single process's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.model.loading import Runtime, freeze
from pipeline.model.reference import ModelReference
from pipeline.model.scoring import CompletionScorer
from pipeline.params import LoraParams
from pipeline.train.adapters import AdaptersOffReference, add_adapters
from pipeline.train.export import save_policy
from tests.helpers import REPO, NoTokenizer, fit, random_pairs, tiny_qwen3, train_params

PER_RANK_BATCH = 2
PARAMS = train_params(
    epochs=2,
    batch_size=2 * PER_RANK_BATCH,
    grad_accum=2,
    warmup_ratio=0.2,
    seed=3,
    nproc=2,
    save_every=100,
)


def policy_and_reference(lora: bool, runtime: Runtime):
    """A fresh tiny policy scorer and its reference: a frozen copy, or with LoRA adapters the
    policy itself with its adapters off."""
    if not lora:
        return CompletionScorer(tiny_qwen3()), ModelReference(
            freeze(CompletionScorer(tiny_qwen3())), runtime
        )
    policy = CompletionScorer(add_adapters(tiny_qwen3(), LoraParams(enabled=True, rank=4)))
    return policy, AdaptersOffReference(policy, runtime)


@pytest.mark.slow  # two worker processes each: ~15 s a case
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "ddp-lora", "fsdp-lora", "ddp-compile"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(
    tmp_path: Path, strategy: str
) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    out = tmp_path / "ddp.json"
    tiny_qwen3().save_pretrained(tmp_path / "base")  # what a sharded LoRA policy merges onto
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests/ddp_worker.py"),
            str(out),
            strategy,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["world"] == 2 and ddp["sharded"] == strategy.startswith("fsdp")

    runtime = Runtime(torch.device("cpu"), None)
    # 22 pairs: the 2-process run drops none (22 % 2 == 0); steps of 2 x 4 pairs, last one short.
    policy, reference = policy_and_reference(strategy.endswith("-lora"), runtime)
    single = fit(
        policy,
        reference,
        random_pairs(22),
        PARAMS,
        runtime,
        0,
        tmp_path / "single",
        "key",
    )
    assert [r["step"] for r in ddp["log"]] == [r["step"] for r in single.log]
    tol = 1e-4 if "-compile" in strategy else 1e-5  # compiled layers against eager ones
    for multi, one in zip(ddp["log"], single.log, strict=True):
        assert multi["loss"] == pytest.approx(one["loss"], abs=tol)
        assert multi["grad_norm"] == pytest.approx(one["grad_norm"], abs=tol)
        assert multi["rewards/margins"] == pytest.approx(one["rewards/margins"], abs=tol)
    assert ddp["resumed_log"] == ddp["log"]
    weights = float(sum(t.double().abs().sum() for t in policy.state_dict().values()))
    assert ddp["weights_abs_sum"] == pytest.approx(weights, rel=tol / 10)
    if strategy.endswith("-lora"):
        save_policy(tmp_path / "single-policy", policy, NoTokenizer(), None, torch.float32)
        for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
            multi, one = (load_file(tmp_path / d / name) for d in ("policy", "single-policy"))
            assert multi.keys() == one.keys(), name
            for key in one:
                torch.testing.assert_close(multi[key], one[key], atol=1e-5, rtol=1e-4, msg=key)
