"""The DPO objective against hand-computed values, and the plain full-logits scorer the fast one is
checked against (tests/plain_dpo.py) against a loop-based reference."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.objective.losses import PairLogps, compute_loss
from pipeline.objective.metrics import STEP_METRIC_KEYS, completion_token_counts
from tests.helpers import objective, step_metrics
from tests.plain_dpo import sequence_logps


def neg_log_sigmoid(z: float) -> float:
    """-log sigmoid(z) = log(1 + exp(-z)), by hand."""
    return math.log(1.0 + math.exp(-z))


def dpo_loss(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pipeline's plain DPO loss (sigmoid, no smoothing) -> (losses, chosen and rejected
    rewards), each (B,)."""
    tokens = torch.ones_like(pc, dtype=torch.int64)
    out = compute_loss(PairLogps(pc, pr, rc, rr, tokens, tokens), objective("sigmoid", beta))
    return out.losses, out.chosen_rewards, out.rejected_rewards


# ---------------------------------------------------------------- the sigmoid DPO loss


def test_dpo_loss_matches_hand_computed_values() -> None:
    # Log-ratio differences (pc - rc) - (pr - rr) of 0, 10 and 20, spread over all four inputs.
    pc = torch.tensor([-5.0, -3.0, -10.0])
    rc = torch.tensor([-5.0, -8.0, -12.0])
    pr = torch.tensor([-7.0, -9.0, -30.0])
    rr = torch.tensor([-7.0, -4.0, -12.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    expected = [neg_log_sigmoid(0.0), neg_log_sigmoid(1.0), neg_log_sigmoid(2.0)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.0, 0.5, 0.2], abs=1e-6)
    assert rejected_rewards.tolist() == pytest.approx([0.0, -0.5, -1.8], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpo_loss_is_ln2_when_policy_equals_reference(dtype: torch.dtype) -> None:
    logps = torch.tensor([-3.25, -120.0, 0.0, -7.5], dtype=dtype)
    other = torch.tensor([-1.0, -80.5, -2.0, -9.0], dtype=dtype)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps, other, logps.clone(), other.clone(), beta=0.3
    )
    assert losses.tolist() == pytest.approx([math.log(2.0)] * 4, abs=1e-7)
    assert chosen_rewards.eq(0).all() and rejected_rewards.eq(0).all()


def test_dpo_loss_gradient_signs_and_values() -> None:
    beta = 0.5
    pc = torch.tensor([-4.0, -6.0], requires_grad=True)
    pr = torch.tensor([-5.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-4.5, -6.0]), torch.tensor([-5.0, -3.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raise chosen, lower rejected
    # d/dpc -log sigmoid(z) = -beta * sigmoid(-z), z = beta * margin; margins 0.5 and -1.
    for i, margin in enumerate([0.5, -1.0]):
        z = beta * margin
        assert pc.grad[i].item() == pytest.approx(-beta / (1.0 + math.exp(z)), rel=1e-6)
        assert pr.grad[i].item() == pytest.approx(beta / (1.0 + math.exp(z)), rel=1e-6)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_loss_large_margins_stay_finite() -> None:
    pc = torch.tensor([1e4, -1e4], requires_grad=True)
    pr = torch.tensor([-1e4, 1e4], requires_grad=True)
    zeros = torch.zeros(2)
    losses, _, _ = dpo_loss(pc, pr, zeros, zeros, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    assert torch.isfinite(pr.grad).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() == pytest.approx(2e4, rel=1e-6)  # -log sigmoid(-x) -> x
    assert pc.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)


# ---------------------------------------------------------------- sequence_logps


def test_sequence_logps_hand_computed() -> None:
    # V = 3. Logits at t=0 are uniform (p = 1/3); at t=1 they are [0, ln 2, 0] (p = 1/4, 1/2, 1/4).
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [5.0, 1.0, -2.0]]])
    labels = torch.tensor([[2, 1, 2]])
    # Prompt = token 0, completion = tokens 1 and 2: log(1/3) + log(1/4).
    got = sequence_logps(logits, labels, torch.tensor([[0, 1, 1]]))
    assert got.tolist() == pytest.approx([math.log(1 / 3) + math.log(1 / 4)], rel=1e-6)
    # Completion = token 2 only (token 1 now prompt): log p(label 2 | t=1) = log(1/4).
    got = sequence_logps(logits, labels, torch.tensor([[0, 0, 1]]))
    assert got.tolist() == pytest.approx([math.log(1 / 4)], rel=1e-6)


def ragged_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, T = 7, V = 11: row 0 prompt 2 / completion 3 / padding 2; row 1 prompt 3 /
    completion 4; the padding labels are out of the vocabulary on purpose."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=gen) * 3
    labels = torch.randint(0, 11, (2, 7), generator=gen)
    labels[0, 5:] = 10_000
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    return logits, labels, mask


def loop_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Plain reference: float64 Python loops, softmax by hand."""
    totals = []
    for b in range(labels.shape[0]):
        total = 0.0
        for t in range(1, labels.shape[1]):
            if mask[b, t]:
                row = logits[b, t - 1].double().tolist()
                normalizer = math.log(sum(math.exp(x) for x in row))
                total += row[int(labels[b, t])] - normalizer
        totals.append(total)
    return totals


def test_sequence_logps_matches_loop_reference_on_random_input() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, 17, generator=gen) * 4
    labels = torch.randint(0, 17, (4, 9), generator=gen)
    mask = torch.rand(4, 9, generator=gen) > 0.4
    mask[3] = False  # a row with no completion token scores 0, not NaN
    got = sequence_logps(logits, labels, mask)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(loop_logps(logits, labels, mask), abs=1e-4)
    assert got[3].item() == 0.0


def test_sequence_logps_ignores_prompt_and_padding_positions() -> None:
    logits, labels, mask = ragged_batch()
    base = sequence_logps(logits, labels, mask)
    assert base.tolist() == pytest.approx(loop_logps(logits, labels, mask), abs=1e-4)
    # Positions whose *next* label is prompt or padding (and the last, which predicts nothing).
    ignored = [(0, 0), (0, 4), (0, 5), (0, 6), (1, 0), (1, 1), (1, 6)]
    for b, t in ignored:
        changed = logits.clone()
        changed[b, t] += torch.linspace(-50, 50, 11)
        assert torch.equal(sequence_logps(changed, labels, mask), base), (b, t)
    for b, t in [(0, 1), (0, 3), (1, 2), (1, 5)]:
        changed = logits.clone()
        changed[b, t] += torch.linspace(-50, 50, 11)
        assert not torch.allclose(sequence_logps(changed, labels, mask)[b], base[b]), (b, t)


def test_sequence_logps_gradient_is_zero_outside_completion() -> None:
    logits, labels, mask = ragged_batch()
    logits.requires_grad_(True)
    sequence_logps(logits, labels, mask).sum().backward()
    scored = torch.zeros(2, 7, dtype=torch.bool)
    scored[:, :-1] = mask[:, 1:].bool()
    assert logits.grad[~scored].abs().max().item() == 0.0
    assert (logits.grad[scored].abs().sum(-1) > 0).all()


def test_sequence_logps_bf16_is_computed_in_fp32() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 16, 2048, generator=gen) * 8).bfloat16()
    labels = torch.randint(0, 2048, (3, 16), generator=gen)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[:, :4] = 0
    got = sequence_logps(logits, labels, mask)
    assert got.dtype == torch.float32
    # Same bf16 values, upcast first: fp32 arithmetic must agree to fp32 rounding. A bf16
    # log_softmax is off by ~0.1 per token here.
    expected = sequence_logps(logits.float(), labels, mask)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)


def test_completion_token_counts_follow_the_shift() -> None:
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]])
    assert completion_token_counts(mask).tolist() == [2, 0, 4]  # position 0 never scored
    # Consistent with sequence_logps: uniform logits give -count * log V.
    logits = torch.zeros(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    expected = [-c * math.log(7) for c in completion_token_counts(mask).tolist()]
    assert sequence_logps(logits, labels, mask).tolist() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- step metrics


def test_step_metrics_keys_and_values_with_a_tie() -> None:
    losses = torch.tensor([0.5, 1.0, 1.5, 2.0])
    chosen_rewards = torch.tensor([1.0, 0.0, 0.2, -1.0])
    rejected_rewards = torch.tensor([0.0, 0.0, 0.5, -2.0])  # win, tie, loss, win
    chosen_logps = torch.tensor([-10.0, -20.0, -30.0, -40.0])
    rejected_logps = torch.tensor([-1.0, -2.0, -3.0, -6.0])
    nll = torch.tensor([2.0, 1.0, 1.5, 3.5])
    got = step_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, nll)
    assert tuple(got) == STEP_METRIC_KEYS
    assert all(type(v) is float for v in got.values())
    assert got == pytest.approx(
        {
            "loss": 1.25,
            "rewards/chosen": 0.05,
            "rewards/rejected": -0.375,
            "rewards/margins": 0.425,
            "rewards/accuracies": 0.625,  # (1 + 0.5 + 0 + 1) / 4
            "logps/chosen": -25.0,
            "logps/rejected": -3.0,
            "nll/chosen": 2.0,
        },
        abs=1e-6,
    )


def test_step_metrics_accuracy_is_half_at_step_one() -> None:
    zeros = torch.zeros(5)
    got = step_metrics(
        torch.full((5,), math.log(2.0)), zeros, zeros, zeros - 3, zeros - 4, zeros + 1
    )
    assert got["rewards/accuracies"] == 0.5
