"""LoRA adapters: the reference is the base model exactly (adapters off), the base never moves,
and a killed run resumes to the uninterrupted result."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from pipeline.model.batches import collate_pairs
from pipeline.model.loading import freeze
from pipeline.model.scoring import CompletionScorer, batch_logps
from pipeline.params import LoraParams
from pipeline.train.adapters import AdaptersOffReference, add_adapters, trainable_parameters
from tests.helpers import CPU, fit, random_pairs, tiny_qwen3, train_params

LORA = LoraParams(enabled=True, rank=4, alpha=8.0)
PARAMS = train_params(lr=1e-2, epochs=2, seed=5, save_every=3, lora=LORA)


def lora_policy() -> CompletionScorer:
    return CompletionScorer(add_adapters(tiny_qwen3(), LORA))


def train(policy: CompletionScorer, folder: Path, params=PARAMS, on_log=None):
    reference = AdaptersOffReference(policy, CPU)
    return fit(policy, reference, random_pairs(16), params, CPU, 0, folder, "k", on_log=on_log)


def test_only_the_adapters_train(tmp_path: Path) -> None:
    policy = lora_policy()
    total = sum(p.numel() for p in policy.parameters())
    assert 0 < trainable_parameters(policy) < 0.2 * total
    result = train(policy, tmp_path / "ckpt")
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at 0
    assert result.log[-1]["loss"] < math.log(2) - 0.02


def test_adapters_off_is_the_base_model_bit_for_bit_after_training(tmp_path: Path) -> None:
    policy, base = lora_policy(), freeze(CompletionScorer(tiny_qwen3()))
    base_weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    train(policy, tmp_path / "ckpt")
    batch = collate_pairs(random_pairs(6, seed=3)[:], 0)
    policy.eval()
    with torch.no_grad():
        off = AdaptersOffReference(policy, CPU)(batch, None)
        assert torch.equal(off, batch_logps(base, batch, CPU))
        assert not torch.equal(batch_logps(policy, batch, CPU), off)  # the adapters did learn
    merged = policy.model.get_base_model().state_dict()
    for name, weight in base_weights.items():  # the frozen base did not move by one bit
        key = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(merged.get(key, merged.get(name)), weight), name


def test_a_killed_lora_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    params = dataclasses.replace(PARAMS, epochs=3)
    whole, whole_result = lora_policy(), None
    whole_result = train(whole, tmp_path / "whole", params)

    class Killed(Exception):
        pass

    def kill_at_step_5(row: dict) -> None:
        if row["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train(lora_policy(), tmp_path / "resumed", params, on_log=kill_at_step_5)
    resumed = lora_policy()
    resumed_result = train(resumed, tmp_path / "resumed", params)
    assert resumed_result.log[-1]["loss"] == pytest.approx(whole_result.log[-1]["loss"], abs=1e-4)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
