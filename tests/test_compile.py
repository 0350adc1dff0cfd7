"""train.compile: layers and train.pad_to_multiple_of on the CPU (inductor compiles there too):
the compiled recipe trains as the eager one does, compiles once per padded shape, and resumes."""

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.model.batches import collate_pairs
from pipeline.model.loading import compile_layers, enable_activation_checkpointing, freeze
from pipeline.model.reference import ModelReference
from pipeline.model.scoring import CompletionScorer
from pipeline.params import LoraParams, ParamsError
from pipeline.train import recipe
from pipeline.train.adapters import AdaptersOffReference, add_adapters
from tests.helpers import (
    CPU,
    compile_layers_aot_eager,
    fit,
    random_pairs,
    tiny_qwen3,
    train_params,
)

pytestmark = pytest.mark.slow  # inductor compiles C++ for each shape: tens of seconds

PARAMS = train_params(epochs=2, seed=3, batch_size=4, save_every=3, pad_to_multiple_of=16)


class Killed(Exception):
    pass


def run(folder: Path, params, compiled: bool, shapes: set | None = None, on_log=None):
    """The recipe on 16 random pairs of mixed lengths, its layers compiled or not."""
    torch._dynamo.reset()
    policy, reference = CompletionScorer(tiny_qwen3()), freeze(CompletionScorer(tiny_qwen3()))
    if compiled:
        assert compile_layers(policy.model) == 2
    result = fit(
        policy,
        ModelReference(reference, CPU),
        random_pairs(16),
        params,
        CPU,
        0,
        folder,
        "key",
        on_log=on_log,
    )
    return policy.model, result


def test_padding_rounds_the_width_and_changes_no_log_prob() -> None:
    pairs = random_pairs(6)[:]
    plain, padded = collate_pairs(pairs, 0), collate_pairs(pairs, 0, multiple=8)
    assert (
        padded.input_ids.shape[1] % 8 == 0 and padded.input_ids.shape[1] >= plain.input_ids.shape[1]
    )
    scorer = CompletionScorer(tiny_qwen3()).eval()
    with torch.no_grad():
        a = scorer(plain.input_ids, plain.attention_mask, plain.completion_mask)
        b = scorer(padded.input_ids, padded.attention_mask, padded.completion_mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_layers_train_as_eager_ones_and_compile_once_per_shape(tmp_path, monkeypatch):
    seen: set[tuple[int, int]] = set()
    collate = recipe.collate_pairs

    def recording(columns, pad_token_id, multiple=0):
        batch = collate(columns, pad_token_id, multiple)
        seen.add(tuple(batch.input_ids.shape))
        return batch

    monkeypatch.setattr(recipe, "collate_pairs", recording)
    eager_model, eager = run(tmp_path / "eager", PARAMS, compiled=False)
    shapes, seen = set(seen), set()
    compiled_model, compiled = run(tmp_path / "compiled", PARAMS, compiled=True)
    assert seen == shapes and all(width % 16 == 0 for _, width in shapes) and len(shapes) >= 2
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= len(shapes), (graphs, shapes)  # both layers share each shape's graph
    for a, b in zip(eager.log, compiled.log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-4)
    for (name, a), (_, b) in zip(
        eager_model.named_parameters(), compiled_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    assert eager_model.state_dict().keys() == compiled_model.state_dict().keys()


def test_compiled_layers_with_adapters_and_checkpointing_train_as_eager_ones(tmp_path) -> None:
    """LoRA adapters inside the compiled layers, each layer's activations recomputed in backward
    by running its compiled graph again: the same losses, gradient norms and adapters. Compiled
    with aot_eager (dynamo's graphs and AOTAutograd, what adapters and checkpointing meet),
    since inductor's code for them is what the test above builds for the plain layers."""
    logs, adapters = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_qwen3()
        enable_activation_checkpointing(model)
        policy = CompletionScorer(add_adapters(model, LoraParams(enabled=True, rank=4)))
        if compiled:
            assert compile_layers_aot_eager(policy.model) == 2
        result = fit(
            policy,
            AdaptersOffReference(policy, CPU),
            random_pairs(16),
            PARAMS,
            CPU,
            0,
            tmp_path / str(compiled),
            "key",
        )
        logs.append(result.log)
        adapters.append({n: p for n, p in policy.named_parameters() if p.requires_grad})
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-4)
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 2 * 7 * 2
    for name, weight in adapters[0].items():
        torch.testing.assert_close(weight, adapters[1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_a_killed_compiled_run_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    whole_model, whole = run(tmp_path / "whole", PARAMS, compiled=True)

    def kill_at_step_5(row: dict) -> None:
        if row["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "resumed", PARAMS, compiled=True, on_log=kill_at_step_5)
    resumed_model, resumed = run(tmp_path / "resumed", PARAMS, compiled=True)
    assert [r["step"] for r in resumed.log] == [r["step"] for r in whole.log]
    assert resumed.log[-1]["loss"] == pytest.approx(whole.log[-1]["loss"], abs=1e-4)
    for (name, a), (_, b) in zip(
        whole_model.named_parameters(), resumed_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_layers_under_fsdp_are_refused_in_one_line() -> None:
    with pytest.raises(ParamsError, match="train.compile: layers with train.parallel: fsdp"):
        dataclasses.replace(PARAMS, compile="layers", nproc=2, parallel="fsdp")
