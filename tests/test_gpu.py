"""The CUDA paths: bf16 autocast, the chunked scorer, activation checkpointing, the token budget,
and the real reference, train and evaluate stages on a tiny model. Skipped without a GPU; run them
on one with `pytest -m gpu`."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys

import pytest
import torch

from pipeline.model.loading import enable_activation_checkpointing, freeze, resolve_runtime
from pipeline.model.reference import ModelReference
from pipeline.model.scoring import CompletionScorer, batch_logps, collate_pairs
from pipeline.train.loop import Resume, train_policy
from tests.helpers import random_pairs, tiny_qwen3, train_params
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
        result = train_policy(
            policy,
            reference,
            random_pairs(16),
            dataclasses.replace(params, **changes),
            cuda,
            0,
            Resume(tmp_path / name, "key"),
        )
        results[name] = result.log
    assert results["plain"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("budget", "checkpointed"):
        for a, b in zip(results["plain"], results[name], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=2e-3), name  # bf16 reductions
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2), name


@pytest.mark.slow
def test_demo_dag_on_cuda(tmp_path, asset_cache) -> None:
    """The real reference, train and evaluate stages on CUDA (bf16 autocast, checkpointing)."""
    pytest.importorskip("dvc", reason="the DAG needs dvc (carry its wheels to a bare GPU machine)")
    pytest.importorskip("mlflow", reason="the train stage logs to mlflow")
    from pipeline.demo.experiment import apply_overrides, demo_overrides
    from tests.e2e import copy_repo, environment, run

    repo = copy_repo(tmp_path / "repo")
    overrides = demo_overrides(repo / "demo" / "params.yaml")
    overrides.update({"train.device": "cuda", "eval.device": "cuda", "train.log_every": 1})
    overrides["train.gradient_checkpointing"] = True
    apply_overrides(repo / "params.yaml", overrides)
    run(repo, environment(asset_cache), sys.executable, "-m", "dvc", "repro", "evaluate")
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert metrics["win_rate"] > 0.8
    # The reference stage scored other batches (other padding, other matmul shapes) than the
    # trainer's first step: in bf16 the two may differ in the last bits, never by a real margin.
    with (repo / "plots" / "train.csv").open() as f:
        first = next(csv.DictReader(f))
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=5e-3)
