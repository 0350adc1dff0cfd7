"""The CUDA paths: bf16 autocast, the chunked scorer, activation checkpointing, the token budget,
no host waits between log rows, compiled layers, QLoRA's 4-bit base, and the real reference,
train and evaluate stages on a tiny model. Skipped without a GPU; run them on one with `pytest -m
gpu` (`make gpu-check` runs them first)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys

import pytest
import torch

from pipeline.model.batches import collate_pairs
from pipeline.model.loading import enable_activation_checkpointing, freeze, resolve_runtime
from pipeline.model.reference import ModelReference
from pipeline.model.scoring import CompletionScorer, batch_logps
from tests.helpers import fit, random_pairs, tiny_qwen3, train_params
from tests.plain_dpo import full_logits_logps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def cuda():
    return resolve_runtime("cuda")


def test_bf16_scorer_matches_the_full_logits_path(cuda) -> None:
    model = tiny_qwen3().to(cuda.device)
    batch = collate_pairs(random_pairs(6)[:], 0).to(cuda.device)
    with torch.no_grad(), cuda.autocast():
        expected = full_logits_logps(model, batch)
    got = batch_logps(CompletionScorer(model), batch, cuda)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-3)  # bf16 matmuls on both


def test_step_one_is_ln2_and_budget_and_checkpointing_keep_the_gradient(cuda, tmp_path) -> None:
    params = train_params(batch_size=8, max_steps=2)
    results = {}
    for name, changes in {
        "plain": {},
        "budget": {"max_tokens_per_micro_batch": 40},
        "checkpointed": {"gradient_checkpointing": True},
    }.items():
        policy = CompletionScorer(tiny_qwen3().to(cuda.device))
        if changes.get("gradient_checkpointing"):
            enable_activation_checkpointing(policy.model)
        reference = ModelReference(freeze(CompletionScorer(tiny_qwen3().to(cuda.device))), cuda)
        result = fit(
            policy,
            reference,
            random_pairs(16),
            dataclasses.replace(params, **changes),
            cuda,
            0,
            tmp_path / name,
            "key",
        )
        results[name] = result.log
    assert results["plain"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("budget", "checkpointed"):
        for a, b in zip(results["plain"], results[name], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=2e-3), name  # bf16 reductions
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2), name


def test_no_step_waits_for_the_gpu_between_log_rows(cuda, tmp_path) -> None:
    """CUDA's own sync detection (`torch.cuda.set_sync_debug_mode`): between log rows a step
    makes the host wait for nothing (no value read back, no data-dependent shape, no blocking
    copy); at log rows and the epoch's end it does."""
    import warnings

    policy, reference = tiny_qwen3().to(cuda.device), tiny_qwen3().to(cuda.device)
    for model in (policy, reference):
        model.set_attn_implementation("sdpa")
    params = train_params(epochs=1, batch_size=2, log_every=3, save_every=100, device="cuda")
    seen: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fit(
                CompletionScorer(policy),
                ModelReference(freeze(CompletionScorer(reference)), cuda),
                random_pairs(16),
                params,
                cuda,
                0,
                tmp_path / "c",
                "key",
                on_step=lambda: seen.append(len(caught)),
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [row["step"] for row in result.log] == [3, 6, 8]
    between = {n: seen[n - 1] - seen[n - 2] for n in range(2, 9)}
    waits = [str(w.message)[:120] for w in caught]
    assert all(between[n] == 0 for n in (2, 3, 5, 6)), (between, waits)
    assert between[4] > 0 and between[7] > 0, (between, waits)  # the rows of steps 3 and 6


def test_compiled_layers_train_as_eager_ones_on_cuda(cuda, tmp_path) -> None:
    """train.compile: layers with padding to a multiple, on CUDA (Triton kernels, bf16
    autocast): the losses and gradient norms of eager layers, within bf16's rounding."""
    from pipeline.model.loading import compile_layers

    params = train_params(batch_size=4, epochs=2, seed=3, pad_to_multiple_of=16, device="cuda")
    logs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        policy = CompletionScorer(tiny_qwen3().to(cuda.device))
        policy.model.set_attn_implementation("sdpa")
        if compiled:
            compile_layers(policy.model)
        reference = ModelReference(freeze(CompletionScorer(tiny_qwen3().to(cuda.device))), cuda)
        logs.append(
            fit(
                policy,
                reference,
                random_pairs(16),
                params,
                cuda,
                0,
                tmp_path / str(compiled),
                "key",
            ).log
        )
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=3e-2)


@pytest.mark.slow
def test_demo_dag_on_cuda(e2e_repo) -> None:
    """The real reference, train and evaluate stages on CUDA (bf16 autocast, checkpointing)."""
    pytest.importorskip("dvc", reason="the DAG needs dvc (carry its wheels to a bare GPU machine)")
    pytest.importorskip("mlflow", reason="the train stage logs to mlflow")
    from tests.e2e import run

    cuda = {"train.device": "cuda", "eval.device": "cuda", "train.log_every": 1}
    repo, env = e2e_repo(
        "gpu-dag", demo_params=True, **cuda, **{"train.gradient_checkpointing": True}
    )
    run(repo, env, sys.executable, "-m", "dvc", "repro", "evaluate")
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert metrics["win_rate"] > 0.8
    # The reference stage scored other batches (other padding, other matmul shapes) than the
    # trainer's first step: in bf16 the two may differ in the last bits, never by a real margin.
    with (repo / "plots" / "train.csv").open() as f:
        first = next(csv.DictReader(f))
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=5e-3)


def test_qlora_trains_adapters_on_a_4bit_base_and_saves_the_dequantised_merge(
    cuda, tmp_path
) -> None:
    """train.lora.quantize: nf4 on CUDA: the stages' check passes, the reference stage's frozen
    4-bit base scores as the adapters-off policy does, training starts at ln 2 and learns, and
    the saved merge scores as the trained policy (bf16 rounding of the saved weights apart)."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (.[qlora])")
    from pipeline.model.loading import check_quantize, load_causal_lm
    from pipeline.model.scoring import load_scorer
    from pipeline.params import LoraParams
    from pipeline.train.adapters import AdaptersOffReference, add_adapters
    from pipeline.train.export import save_policy
    from tests.helpers import NoTokenizer

    check_quantize("nf4", cuda, "train.device")  # CUDA and bitsandbytes: accepted
    tiny_qwen3().save_pretrained(tmp_path / "base")
    lora = LoraParams(enabled=True, rank=4, alpha=8.0, quantize="nf4")
    model = load_causal_lm(tmp_path / "base", cuda, False, "nf4")
    policy = CompletionScorer(add_adapters(model, lora))
    adapters_off = AdaptersOffReference(policy, cuda)
    batch = collate_pairs(random_pairs(6, seed=3)[:], 0).to(cuda.device)
    cached = freeze(load_scorer(tmp_path / "base", cuda, False, "nf4"))  # the reference stage's
    with torch.no_grad():
        torch.testing.assert_close(
            batch_logps(cached, batch, cuda), adapters_off(batch, None), atol=2e-2, rtol=1e-3
        )
    params = train_params(lr=1e-2, epochs=3, seed=5, lora=lora, device="cuda")
    result = fit(policy, adapters_off, random_pairs(16), params, cuda, 0, tmp_path / "ck", "k")
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.log[-1]["loss"] < math.log(2) - 0.01
    with torch.no_grad():
        trained = batch_logps(policy, batch, cuda)
    folder = tmp_path / "policy"
    save_policy(folder, policy, NoTokenizer(), None, torch.bfloat16, tmp_path / "base")
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    served = CompletionScorer(load_causal_lm(folder, cuda, False))
    with torch.no_grad():
        torch.testing.assert_close(batch_logps(served, batch, cuda), trained, atol=5e-2, rtol=2e-2)
