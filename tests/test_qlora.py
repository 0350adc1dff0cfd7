"""QLoRA (train.lora.quantize: nf4): the stages refuse it off CUDA or without bitsandbytes, the
reference cache records the 4-bit base, and, through bitsandbytes' CPU backend, the library path
itself: a 4-bit base under fp32 adapters trains, stays frozen, is its own reference with the
adapters off, and is saved as the adapter plus a model merged onto the dequantised base."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.model import loading, reference
from pipeline.model.batches import collate_pairs
from pipeline.model.loading import Runtime, check_quantize, load_causal_lm, nf4_config
from pipeline.model.reference import StaleReference
from pipeline.model.scoring import CompletionScorer, batch_logps
from pipeline.params import LoraParams, load_params
from pipeline.stage_io import StageError
from pipeline.train import export, setup
from pipeline.train.adapters import AdaptersOffReference, add_adapters, dequantized_weights
from tests.helpers import CPU, NoTokenizer, fit, random_pairs, tiny_qwen3, train_params

CUDA = Runtime(torch.device("cuda"), torch.bfloat16)  # check_quantize reads the device type only
LORA = LoraParams(enabled=True, rank=4, alpha=8.0, quantize="nf4")
PEFT_PREFIX = "model.base_model.model."  # scorer.model, then peft's wrappers of the HF model


def test_nf4_is_qloras_recipe() -> None:
    config = nf4_config()
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_use_double_quant


def test_a_4bit_base_off_cuda_is_refused_in_one_line_with_the_way_out() -> None:
    check_quantize("none", CPU, "train.device")  # nothing to refuse
    with pytest.raises(StageError) as error:
        check_quantize("nf4", CPU, "train.device")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("train.lora.quantize: nf4 needs a CUDA GPU, but train.device")
    assert "set train.lora.quantize: none" in message


def test_no_bitsandbytes_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(StageError, match=re.escape("pip install bitsandbytes")):
        check_quantize("nf4", CUDA, "train.device")


def test_the_stages_refuse_before_loading_anything(
    params_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.model import precompute as reference_stage

    text = params_file.read_text().replace("enabled: false", "enabled: true")
    params_file.write_text(text.replace("quantize: none", "quantize: nf4"))
    params = load_params(params_file)
    monkeypatch.chdir(tmp_path)  # no models/base here: a load would fail otherwise
    with pytest.raises(StageError, match=re.escape("but train.device runs on cpu")):
        setup.load_policy(params, CPU)
    with pytest.raises(StageError, match=re.escape("but train.device runs on cpu")):
        reference_stage.check_devices(params)  # the reference stage's first step
    # Each split is scored on its own stage's device: train on a GPU, evaluation on the CPU.
    monkeypatch.setattr(reference_stage, "resolve_runtime", lambda d: CPU if d == "cpu" else CUDA)
    monkeypatch.setattr(loading, "is_bitsandbytes_available", lambda: True)
    params = dataclasses.replace(params, eval=dataclasses.replace(params.eval, device="cpu"))
    with pytest.raises(StageError, match=re.escape("but eval.device runs on cpu")):
        reference_stage.check_devices(params)


def test_a_cache_of_the_other_base_precision_is_refused(
    saved_model_and_pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, data_dir = saved_model_and_pairs
    plain, nf4 = (reference.describe(model_dir, data_dir, CUDA, q) for q in ("none", "nf4"))
    assert plain != nf4
    reference.save(tmp_path / "plain", np.zeros((6, 2)), plain)
    reference.save(tmp_path / "nf4", np.zeros((6, 2)), nf4)
    with pytest.raises(StaleReference, match=re.escape("quantize: cached 'none', now 'nf4'")):
        reference.load(tmp_path / "plain", nf4, 6)
    with pytest.raises(StaleReference, match=re.escape("quantize: cached 'nf4', now 'none'")):
        reference.load(tmp_path / "nf4", plain, 6)


def nf4_policy(base_dir: Path) -> CompletionScorer:
    """The tiny base in 4-bit under fp32 adapters, in train mode: on an eval-mode forward without
    gradients, bitsandbytes' CPU backend repacks the 4-bit weights into an inference-only layout
    (no autograd), which training never does."""
    return CompletionScorer(add_adapters(load_causal_lm(base_dir, CPU, False, "nf4"), LORA)).train()


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    pytest.importorskip("bitsandbytes", reason="the 4-bit path needs bitsandbytes (.[qlora])")
    tiny_qwen3().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_the_base_is_4bit_and_only_fp32_adapters_train(base_dir: Path) -> None:
    import bitsandbytes as bnb

    policy = nf4_policy(base_dir)
    linears = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # every attention and MLP linear of both layers; not the LM head
    for module in linears:
        state = module.weight.quant_state
        assert module.weight.dtype == torch.uint8 and not module.weight.requires_grad
        assert (state.quant_type, state.nested) == ("nf4", True)  # nested: double quantisation
        assert module.compute_dtype == torch.bfloat16
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n and p.dtype == torch.float32 for n, p in trainable.items()
    )


def test_gradients_through_the_4bit_base_match_its_dequantised_weights(base_dir: Path) -> None:
    """The first layer's adapters learn through the second layer's 4-bit linears: their
    gradients equal those of a plain fp32 model holding the dequantised weights, up to the bf16
    matmuls bitsandbytes runs (a gradient lost in the 4-bit layers would be far off)."""
    nf4 = nf4_policy(base_dir)
    plain_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plain_base.load_state_dict(dequantized_weights(nf4.model), strict=False)
    plain = CompletionScorer(add_adapters(plain_base, LORA)).train()
    adapters = {k: v for k, v in nf4.state_dict().items() if "lora_" in k}
    plain.load_state_dict(adapters, strict=False)
    for name, module in nf4.named_modules():  # B = 0 at the start: make the adapters act
        if name.endswith("lora_B.default"):
            torch.nn.init.normal_(
                module.weight, std=0.1, generator=torch.Generator().manual_seed(1)
            )
            plain.get_submodule(name).weight.data.copy_(module.weight.data)
    batch = collate_pairs(random_pairs(6, seed=3)[:], 0)
    grads = []
    for scorer in (nf4, plain):
        batch_logps(scorer, batch, CPU).sum().backward()
        grads.append({n: p.grad for n, p in scorer.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    first_layer = [n for n in grads[0] if ".layers.0." in n]
    assert first_layer and all(grads[0][n].abs().sum() > 0 for n in first_layer)
    for name, grad in grads[0].items():  # measured: at most 1.7 % apart, cosine >= 0.9998
        error = float((grad - grads[1][name]).norm() / grads[1][name].norm())
        assert error < 0.03, (name, error)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4-bit policy trained 12 steps of 4 pairs with its adapters-off reference, what it
    started from, and the (chosen; rejected) scores before and after on 6 other pairs."""
    bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit path needs bitsandbytes (.[qlora])")

    root = tmp_path_factory.mktemp("qlora")
    tiny_qwen3().save_pretrained(root / "base")
    policy = nf4_policy(root / "base")
    frozen = {
        n: m.weight.data.clone()
        for n, m in policy.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    batch = collate_pairs(random_pairs(6, seed=3)[:], 0)
    reference_scores = AdaptersOffReference(policy, CPU)
    start = reference_scores(batch, None)
    with torch.no_grad():
        untrained = batch_logps(policy, batch, CPU)
    params = train_params(lr=1e-2, epochs=3, seed=5, lora=LORA)
    result = fit(policy, reference_scores, random_pairs(16), params, CPU, 0, root / "ck", "k")
    with torch.no_grad():
        scores = batch_logps(policy, batch, CPU)
    return {
        "root": root,
        "policy": policy,
        "frozen": frozen,
        "batch": batch,
        "start": start,
        "untrained": untrained,
        "result": result,
        "scores": scores,
    }


def test_nf4_adapters_learn_while_the_4bit_base_stays_the_reference(trained: dict) -> None:
    import bitsandbytes as bnb

    # The adapters start at 0: the policy is its reference bit for bit, the loss exactly ln 2.
    assert torch.equal(trained["untrained"], trained["start"])
    log = trained["result"].log
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[-1]["loss"] < math.log(2) - 0.01  # measured 0.626
    policy = trained["policy"]
    for name, module in policy.named_modules():  # the 4-bit base did not move by one bit
        if isinstance(module, bnb.nn.Linear4bit):
            assert torch.equal(module.weight.data, trained["frozen"][name]), name
    adapters_off = AdaptersOffReference(policy, CPU)(trained["batch"], None)
    assert torch.equal(adapters_off, trained["start"])


def test_saved_nf4_policy_is_its_adapter_and_a_merge_onto_the_dequantised_base(
    trained: dict,
) -> None:
    policy, root = trained["policy"], trained["root"]
    dequantised = dequantized_weights(policy.model)
    with torch.no_grad():
        delta = {
            n.removeprefix(PEFT_PREFIX) + ".weight": m.get_delta_weight("default")
            for n, m in policy.named_modules()
            if n.endswith("q_proj")
        }
    assert len(delta) == 2
    folder = root / "policy"
    export.save_policy(folder, policy, NoTokenizer(), None, torch.bfloat16, root / "base")
    adapter_files = {p.name for p in (folder / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= adapter_files
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = load_file(folder / "model.safetensors")
    original = load_file(root / "base" / "model.safetensors")
    for key, update in delta.items():
        expected = (dequantised[key] + update).to(torch.bfloat16)
        torch.testing.assert_close(merged[key], expected, atol=0, rtol=2**-7)  # 1 bf16 ulp
        assert not torch.equal(merged[key], (original[key] + update).to(torch.bfloat16))
    served = CompletionScorer(load_causal_lm(folder, CPU, False))  # how evaluate loads it
    with torch.no_grad():
        scores = batch_logps(served, trained["batch"], CPU)
    # Measured 0.002 apart (bf16 rounding of the saved weights); merged onto the original base
    # instead, the quantisation error alone moves these scores by ~0.1.
    torch.testing.assert_close(scores, trained["scores"], atol=1e-2, rtol=0)


def test_a_killed_nf4_run_resumes_to_the_uninterrupted_result(
    base_dir: Path, tmp_path: Path
) -> None:
    """Checkpoints of a 4-bit policy hold its adapters (the base is re-read from its folder)."""
    params = train_params(lr=1e-2, epochs=2, seed=5, save_every=3, lora=LORA)

    def train(folder: str, on_log=None) -> tuple[CompletionScorer, list[dict]]:
        torch.manual_seed(0)  # the same adapter initialisation every time
        policy = nf4_policy(base_dir)
        reference_scores = AdaptersOffReference(policy, CPU)
        result = fit(
            policy,
            reference_scores,
            random_pairs(16),
            params,
            CPU,
            0,
            tmp_path / folder,
            "k",
            on_log=on_log,
        )
        return policy, result.log

    class Killed(Exception):
        pass

    def kill_at_step_5(row: dict) -> None:
        if row["step"] == 5:
            raise Killed

    whole, whole_log = train("whole")
    with pytest.raises(Killed):
        train("resumed", kill_at_step_5)
    resumed, resumed_log = train("resumed")
    assert resumed_log[-1]["loss"] == pytest.approx(whole_log[-1]["loss"], abs=1e-5)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
