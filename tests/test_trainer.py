import copy
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.model.batches import collate_pairs
from pipeline.model.loading import assert_frozen, enable_activation_checkpointing, freeze
from pipeline.model.reference import ModelReference
from pipeline.model.scoring import CompletionScorer, batch_logps
from pipeline.params import LossParams, TrainParams
from pipeline.train.plan import epoch_order, optimizer_steps
from pipeline.train.schedule import linear_schedule
from pipeline.train.steps import NonFiniteLoss
from tests.helpers import CPU, REPO, fit, loss_params, random_pairs, tiny_qwen3, train_params

PARAMS = train_params(epochs=2, seed=7, save_every=2)


def run(
    tmp_path: Path,
    params: TrainParams = PARAMS,
    n_pairs: int = 16,
    on_log=None,
    ckpt: str = "ckpt",
    loss: LossParams | None = None,
):
    policy, reference = CompletionScorer(tiny_qwen3()), freeze(CompletionScorer(tiny_qwen3()))
    result = fit(
        policy,
        ModelReference(reference, CPU),
        random_pairs(n_pairs),
        params,
        CPU,
        0,
        tmp_path / ckpt,
        "key",
        loss=loss,
        on_log=on_log,
    )
    return policy.model, reference.model, result


def test_step_one_loss_is_ln2(tmp_path: Path) -> None:
    _, _, result = run(tmp_path, dataclasses.replace(PARAMS, max_steps=1))
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_training_lowers_the_loss_and_leaves_the_reference_alone(tmp_path: Path) -> None:
    before = copy.deepcopy(tiny_qwen3().state_dict())
    policy, reference, result = run(tmp_path, dataclasses.replace(PARAMS, epochs=4))
    assert result.log[-1]["loss"] < math.log(2) - 0.05
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert_frozen(reference)
    assert len(result.epoch_losses) == 4


def test_reference_must_be_frozen() -> None:
    with pytest.raises(AssertionError, match="reference"):
        assert_frozen(tiny_qwen3().train())


def test_concatenated_forward_equals_separate_forwards() -> None:
    model, data = tiny_qwen3(), random_pairs(3)
    rows = data[:]
    both = batch_logps(CompletionScorer(model), collate_pairs(rows, 0), CPU)
    for side, half in (("chosen", both[:3]), ("rejected", both[3:])):
        alone = {
            "prompt_input_ids": rows["prompt_input_ids"],
            "chosen_input_ids": rows[f"{side}_input_ids"],
            "rejected_input_ids": rows[f"{side}_input_ids"],
        }
        separate = batch_logps(CompletionScorer(model), collate_pairs(alone, 0), CPU)[:3]
        torch.testing.assert_close(half, separate, atol=1e-5, rtol=0)


def test_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    # Random (not length-grouped) order: grouping depends on the micro-batch size by design.
    one_step = dataclasses.replace(
        PARAMS, batch_size=4, grad_accum=1, max_steps=1, length_grouping=False
    )
    accumulated = dataclasses.replace(
        PARAMS, batch_size=1, grad_accum=4, max_steps=1, length_grouping=False
    )
    big, _, big_result = run(tmp_path, one_step, ckpt="a")
    small, _, small_result = run(tmp_path, accumulated, ckpt="b")
    assert big_result.log[0]["loss"] == pytest.approx(small_result.log[0]["loss"], abs=1e-6)
    assert big_result.log[0]["grad_norm"] == pytest.approx(
        small_result.log[0]["grad_norm"], rel=1e-4
    )
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    params = dataclasses.replace(PARAMS, epochs=3, save_every=3)
    whole, _, whole_result = run(tmp_path, params, ckpt="whole")

    def kill_at_step_5(row: dict) -> None:
        if row["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path, params, on_log=kill_at_step_5, ckpt="resumed")
    assert [p.name for p in (tmp_path / "resumed").iterdir()] == ["step-00000003"]
    resumed, _, resumed_result = run(tmp_path, params, ckpt="resumed")
    assert resumed_result.log[-1]["loss"] == pytest.approx(whole_result.log[-1]["loss"], abs=1e-4)
    assert [r["step"] for r in resumed_result.log] == [r["step"] for r in whole_result.log]
    assert resumed_result.epoch_losses == pytest.approx(whole_result.epoch_losses, abs=1e-4)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_a_checkpoint_of_other_inputs_is_not_resumed(tmp_path: Path) -> None:
    run(tmp_path, dataclasses.replace(PARAMS, max_steps=2), ckpt="c")
    policy, reference = CompletionScorer(tiny_qwen3()), freeze(CompletionScorer(tiny_qwen3()))
    result = fit(
        policy,
        ModelReference(reference, CPU),
        random_pairs(16),
        dataclasses.replace(PARAMS, max_steps=2),
        CPU,
        0,
        tmp_path / "c",
        "other-key",
    )
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # started afresh


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    policy, reference = CompletionScorer(tiny_qwen3()), freeze(CompletionScorer(tiny_qwen3()))

    def poison_after_step_2(row: dict) -> None:
        if row["step"] == 2:
            with torch.no_grad():
                policy.model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLoss, match="step 3"):
        fit(
            policy,
            ModelReference(reference, CPU),
            random_pairs(16),
            PARAMS,
            CPU,
            0,
            tmp_path / "n",
            "key",
            on_log=poison_after_step_2,
        )
    assert [p.name for p in (tmp_path / "n").iterdir()] == ["step-00000002"]


def test_epoch_order_is_seeded_and_steps_cover_every_pair() -> None:
    assert (epoch_order(10, 1, 0) == epoch_order(10, 1, 0)).all()
    assert not (epoch_order(10, 1, 0) == epoch_order(10, 1, 1)).all()
    steps = optimizer_steps(epoch_order(10, 1, 0), batch_size=3, grad_accum=2)
    assert [[len(m) for m in s] for s in steps] == [[3, 3], [3, 1]]
    assert sorted(int(i) for s in steps for m in s for i in m) == list(range(10))


@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 10), (1, 1), (10, 10), (5, 37)])
def test_the_lr_schedule_is_transformers_linear_schedule_step_for_step(warmup, total) -> None:
    from transformers import get_linear_schedule_with_warmup

    def lrs(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        schedule, seen = make(optimizer, warmup, total), []
        for _ in range(total + 3):  # past the end too: the factor stays 0
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return seen

    ours = lrs(linear_schedule)
    assert ours == lrs(get_linear_schedule_with_warmup)  # exactly, float for float
    assert ours[total] == 0.0 and max(ours) <= 3e-4


# Ops after which a GPU's host waits for the device: reading a value back, and ops whose output
# size depends on values (nonzero, boolean indexing, unique, repeat_interleave without a size).
SYNC_OPS = {
    "_local_scalar_dense",
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "unique_consecutive",
    "repeat_interleave",
}


class SyncOps(TorchDispatchMode):
    """Records, as 'op at file:line', each op run that would make a GPU's host wait, wherever it
    is called from (the pipeline, transformers, torch), except where the host is meant to work:
    `collate_pairs` builds the batch on the host, and the optimizer step, which on the CPU reads
    AdamW's step counts (on CUDA it is fused and reads nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if name in SYNC_OPS or boolean_index:
            self._record(func.__name__)
        return func(*args, **(kwargs or {}))

    def _record(self, op: str) -> None:
        frame, where = sys._getframe(2), None
        while frame is not None:
            code = frame.f_code
            if code.co_name == "collate_pairs" or "/torch/optim/" in code.co_filename:
                return
            if where is None and "/torch/" not in code.co_filename:
                where = f"{Path(code.co_filename).name}:{frame.f_lineno}"
            frame = frame.f_back
        self.seen.append(f"{op} at {where}")


def test_no_step_waits_for_the_device_between_log_rows(tmp_path: Path, monkeypatch) -> None:
    """A step queues its work and goes on: nothing in it makes the host wait for a GPU except a
    log row or a checkpoint. Checked on the CPU two ways, with SDPA as the stages load it:
    `SyncOps` sees every op that waits (in the pipeline, transformers' masks, torch), and the
    pipeline's own reads of a tensor (cpu, numpy, tolist: no ops on the CPU) are counted by
    wrapping them, for calls made from pipeline/."""
    reads: list[str] = []

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(str(REPO / "pipeline")):
                reads.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("cpu", "numpy", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    params = dataclasses.replace(PARAMS, epochs=1, batch_size=2, log_every=3, save_every=100)
    policy, reference = tiny_qwen3(), tiny_qwen3()
    for model in (policy, reference):
        model.set_attn_implementation("sdpa")
    seen: list[int] = []  # waits so far, after each step
    with SyncOps() as syncs:
        result = fit(
            CompletionScorer(policy),
            ModelReference(freeze(CompletionScorer(reference)), CPU),
            random_pairs(16),
            params,
            CPU,
            0,
            tmp_path / "c",
            "key",
            on_step=lambda: seen.append(len(reads) + len(syncs.seen)),
        )
    assert [row["step"] for row in result.log] == [3, 6, 8]
    # Waits between step n-1's hook and step n's: step n-1's log row (if any), then step n.
    between = {n: seen[n - 1] - seen[n - 2] for n in range(2, 9)}
    assert all(between[n] == 0 for n in (2, 3, 5, 6)), (between, reads, syncs.seen)
    assert between[4] > 0 and between[7] > 0 and between[8] > 0  # rows 3 and 6; the epoch end


def test_the_sync_detector_sees_boolean_indexing_and_reads() -> None:
    x = torch.arange(6.0)
    with SyncOps() as syncs:
        x[x > 2].sum()
        float(x.sum())
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert [s.split(" at ")[0] for s in syncs.seen] == [
        "index.Tensor",
        "_local_scalar_dense.default",
        "repeat_interleave.Tensor",
    ]


def test_log_rows_hold_what_dvc_yaml_plots(tmp_path: Path) -> None:
    """Every row has every curve dvc.yaml draws from plots/train.csv, as finite numbers."""
    import yaml

    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    drawn = {
        y for plot in plots for spec in plot.values() for y in spec["y"].get("plots/train.csv", [])
    } | {"step"}
    _, _, result = run(tmp_path, dataclasses.replace(PARAMS, max_steps=2))
    assert len(drawn) == 4 and all(drawn <= set(row) for row in result.log)
    assert all(math.isfinite(v) for row in result.log for v in row.values())


def test_length_grouping_is_a_seeded_permutation_with_less_padding() -> None:
    import numpy as np

    from pipeline.train.plan import length_grouped_order, padded_share

    rng = np.random.default_rng(0)
    # Answers of one pair have related lengths (same question), pairs differ widely.
    lengths = rng.integers(10, 500, size=(1000, 1)) + rng.integers(0, 20, size=(1000, 2))
    order = length_grouped_order(lengths, 8, seed=1, epoch=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert (order == length_grouped_order(lengths, 8, seed=1, epoch=0)).all()
    assert not (order == length_grouped_order(lengths, 8, seed=1, epoch=1)).all()
    grouped = padded_share(lengths, order, 8)
    random = padded_share(lengths, epoch_order(1000, 1, 0), 8)
    assert grouped < random / 2
    # Batch order stays random: the first batches are not simply the longest ones.
    firsts = [lengths[order[i : i + 8]].max() for i in range(0, 80, 8)]
    assert firsts != sorted(firsts, reverse=True)


def test_padded_share_by_hand() -> None:
    import numpy as np

    from pipeline.train.plan import padded_share

    lengths = np.array([[4, 2], [1, 1]])
    # One micro-batch of both pairs: 4 rows padded to 4 -> 16 positions, 8 real.
    assert padded_share(lengths, np.array([0, 1]), 2) == 0.5
    assert padded_share(lengths, np.array([0, 1]), 1) == 1 - 8 / 10


# Step-1 losses with policy == reference (every log-ratio 0), by hand: sigmoid and robust give
# ln 2 for any eps, IPO (0 - 1 / (2 beta))^2 = 25 at beta 0.1, hinge relu(1 - 0) = 1.
@pytest.mark.parametrize(
    ("loss", "settings", "step_one"),
    [
        ("robust", {"label_smoothing": 0.2}, math.log(2)),
        ("ipo", {}, 25.0),
        ("hinge", {}, 1.0),
        ("sigmoid", {"label_smoothing": 0.1}, math.log(2)),
    ],
)
def test_loss_variants_run_in_the_real_loop(
    tmp_path: Path, loss: str, settings: dict, step_one: float
) -> None:
    params = dataclasses.replace(PARAMS, epochs=4)
    _, _, result = run(tmp_path, params, loss=loss_params(variant=loss, **settings))
    assert result.log[0]["loss"] == pytest.approx(step_one, abs=1e-6)
    assert result.log[-1]["loss"] < result.log[0]["loss"] - 0.02
    assert result.log[-1]["rewards/margins"] > 0


def test_sft_weight_adds_the_logged_chosen_nll(tmp_path: Path) -> None:
    params = dataclasses.replace(PARAMS, max_steps=1)
    _, _, result = run(tmp_path, params, loss=loss_params(sft_weight=0.5))
    first = result.log[0]
    assert first["nll/chosen"] > 0
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll/chosen"], abs=1e-5)


def test_reference_free_simpo_trains_without_a_reference(tmp_path: Path) -> None:
    params = dataclasses.replace(PARAMS, epochs=4)
    simpo = loss_params(variant="simpo", gamma=0.5, beta=2.0, reference_free=True)
    policy = CompletionScorer(tiny_qwen3())
    result = fit(policy, None, random_pairs(16), params, CPU, 0, tmp_path / "c", "k", loss=simpo)
    assert result.log[-1]["loss"] < result.log[0]["loss"] - 0.02
    with pytest.raises(ValueError, match="reference=None exactly when"):
        run(tmp_path, params, loss=simpo)  # a reference given to reference-free training: error


def test_the_summary_throughput_is_the_whole_runs(tmp_path: Path) -> None:
    """pairs/s over the whole run (steps, logging, checkpoints): never above the fastest log
    window's steps alone, and the pairs of every step counted."""
    _, _, result = run(tmp_path, dataclasses.replace(PARAMS, max_steps=6, save_every=3))
    figures = result.summary()
    assert 0 < figures["pairs_per_s"] <= max(row["pairs/s"] for row in result.log)
    pairs = figures["pairs_per_s"] * figures["train_seconds"]  # train_seconds: 2 decimals
    assert abs(pairs - 6 * PARAMS.batch_size) <= 0.005 * figures["pairs_per_s"] + 1e-6
    assert figures["steps"] == 6 and figures["final_loss"] == result.log[-1]["loss"]


def test_a_run_whose_loss_exploded_is_flagged_even_when_it_settles(tmp_path: Path) -> None:
    """lr 1000 throws the tiny policy far off: the logged loss passes 10 x ln 2."""
    _, _, calm = run(tmp_path, dataclasses.replace(PARAMS, max_steps=4), ckpt="calm")
    assert calm.summary()["diverged"] is False and calm.summary()["max_loss"] < 1
    _, _, wild = run(tmp_path, dataclasses.replace(PARAMS, lr=1000.0, max_steps=8), ckpt="wild")
    figures = wild.summary()
    assert figures["diverged"] is True
    assert figures["max_loss"] == max(row["loss"] for row in wild.log) > 10 * math.log(2)


def test_padded_share_is_reported_per_epoch_and_grouping_lowers_it(tmp_path: Path) -> None:
    _, _, result = run(tmp_path, dataclasses.replace(PARAMS, max_steps=1), n_pairs=64)
    padding = result.summary()
    assert len(padding["padded_share_per_epoch"]) == PARAMS.epochs
    assert 0 < padding["padded_share"] < padding["padded_share_random"] < 1


# ---------------------------------------------------------------- memory: token budget, recompute


def test_forward_parts_keep_a_micro_batch_that_fits_and_cut_one_that_does_not() -> None:
    from pipeline.train.distributed import World
    from pipeline.train.plan import forward_parts

    lengths = np.array([[10, 12], [50, 40], [5, 5], [30, 31], [100, 90], [8, 9]])
    micro = np.array([0, 1, 2, 3, 4, 5])
    # 2 rows x 6 pairs x 100 tokens = 1200 padded tokens.
    assert forward_parts(micro, lengths, World(), 1200)[0] is micro
    assert forward_parts(micro, lengths, World(), 0)[0] is micro  # 0: no limit
    parts = forward_parts(micro, lengths, World(), 130)
    assert sorted(np.concatenate(parts).tolist()) == micro.tolist()  # every pair, once
    for part in parts:  # within budget, or a single pair longer than it (the 100-token one)
        assert 2 * len(part) * lengths[part].max() <= 130 or len(part) == 1
    assert [len(p) for p in parts] == [1, 1, 2, 2]  # longest first, then as many as fit
    two = World(rank=0, size=2)
    parts = forward_parts(micro, lengths, two, 130)
    assert all(len(p) % 2 == 0 for p in parts)  # both ranks run every part, none empty
    for part in parts:
        for rank in range(2):
            mine = np.array_split(part, 2)[rank]
            assert 2 * len(mine) * lengths[mine].max() <= 130 or len(mine) == 1


def test_a_token_budget_gives_the_gradient_of_one_big_batch(tmp_path: Path) -> None:
    one = dataclasses.replace(PARAMS, batch_size=8, max_steps=2)
    # ~20-token pairs: 40 padded tokens per forward means one or two pairs at a time.
    split = dataclasses.replace(one, max_tokens_per_micro_batch=40)
    big, _, big_result = run(tmp_path, one, ckpt="big")
    small, _, small_result = run(tmp_path, split, ckpt="small")
    for a, b in zip(big_result.log, small_result.log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    batch = collate_pairs(random_pairs(4)[:], 0)
    grads = []
    for checkpointed in (False, True):
        model = tiny_qwen3().train()
        if checkpointed:
            enable_activation_checkpointing(model)
        scorer = CompletionScorer(model)  # before counting: its load-time check runs forwards
        calls, projection = [], model.model.layers[0].mlp.down_proj
        projection.forward = lambda x, run=projection.forward, n=calls: n.append(1) or run(x)
        batch_logps(scorer, batch, CPU).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert len(calls) == (2 if checkpointed else 1)  # recomputed in backward, not stored
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_out_of_memory_names_what_to_lower_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.train.recipe import DPORecipe
    from pipeline.train.steps import OutOfMemory

    real_step, calls = DPORecipe._optimizer_step, []

    def step_that_runs_out_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(DPORecipe, "_optimizer_step", step_that_runs_out_at_step_3)
    with pytest.raises(OutOfMemory) as error:
        run(tmp_path, dataclasses.replace(PARAMS, max_tokens_per_micro_batch=4096), ckpt="oom")
    message = str(error.value)
    assert "step 3" in message and "train.max_tokens_per_micro_batch (now 4096)" in message
    assert "train.gradient_checkpointing: true" in message
    assert "checkpoint of step 2 is kept" in message
    assert [p.name for p in (tmp_path / "oom").iterdir()] == ["step-00000002"]


def test_policy_is_saved_in_the_base_models_dtype(tmp_path: Path, demo_tokenizer) -> None:
    from safetensors import safe_open

    from pipeline.model.loading import load_causal_lm
    from pipeline.model.scoring import score_pairs
    from pipeline.train.export import base_dtype, save_policy

    tiny_qwen3().to(torch.bfloat16).save_pretrained(tmp_path / "base")  # ships in bf16, as Qwen3
    assert base_dtype(tmp_path / "base", trust_remote_code=False) == torch.bfloat16
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        trained = CompletionScorer(tiny_qwen3(seed=1))  # fp32 master weights after training
        save_policy(tmp_path / name, trained, demo_tokenizer, None, dtype)
    weights = {n: tmp_path / n / "model.safetensors" for n in ("fp32", "bf16")}
    with safe_open(weights["bf16"], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert weights["bf16"].stat().st_size < 0.6 * weights["fp32"].stat().st_size
    data = random_pairs(8)
    scores = [
        np.concatenate(
            score_pairs(
                CompletionScorer(load_causal_lm(tmp_path / n, CPU, False)), data, 4, CPU, 0, n
            )
        )
        for n in ("fp32", "bf16")
    ]
    # Evaluation upcasts to fp32: the saved bf16 weights change log-probs by bf16 rounding only.
    np.testing.assert_allclose(scores[1], scores[0], rtol=2e-2)
    assert not np.array_equal(scores[1], scores[0])


def test_a_run_cut_inside_an_epoch_reports_that_part_of_the_epoch(tmp_path: Path) -> None:
    """max_steps inside the first epoch: its mean loss so far is the one epoch loss reported."""
    _, _, result = run(tmp_path, dataclasses.replace(PARAMS, max_steps=2), n_pairs=16)
    (epoch,) = result.summary()["epoch_losses"]  # 2 of 4 steps of epoch 1
    assert epoch == pytest.approx(np.mean([row["loss"] for row in result.log]), abs=1e-6)
