"""Loss variants against hand-computed values (plain `math`), their limits and gradient signs."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch

from pipeline.objective.losses import VARIANTS, PairLogps, compute_loss, robust_loss, sigmoid_loss
from pipeline.params import LABEL_SMOOTHED, REFERENCE_FREE, LossParams
from pipeline.strict_yaml import ParamsError, parse_section, read_yaml
from tests.helpers import REPO, objective
from tests.plain_dpo import dpo_loss

# Three pairs, float64 so hand values compare tightly. Margins h = (pc - rc) - (pr - rr):
# pair 0: (-10 + 11) - (-14 + 12.5) = 2.5; pair 1: (-6 + 5) - (-3 + 4) = -2; pair 2: 0.
PC = [-10.0, -6.0, -8.0]
PR = [-14.0, -3.0, -9.0]
RC = [-11.0, -5.0, -8.0]
RR = [-12.5, -4.0, -9.0]
NC = [4, 3, 5]
NR = [7, 2, 5]
BETA = 0.1


def softplus(x: float) -> float:
    """log(1 + e^x) = -log sigmoid(-x), by hand."""
    return math.log1p(math.exp(x))


def margins() -> list[float]:
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)]


def average_margins() -> list[float]:
    rows = zip(PC, PR, RC, RR, NC, NR, strict=True)
    return [(pc - rc) / nc - (pr - rr) / nr for pc, pr, rc, rr, nc, nr in rows]


def pairs(requires_grad: bool = False, reference: bool = True) -> PairLogps:
    def t(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)

    zeros = [0.0] * len(PC)
    return PairLogps(
        t(PC),
        t(PR),
        torch.tensor(RC if reference else zeros, dtype=torch.float64),
        torch.tensor(RR if reference else zeros, dtype=torch.float64),
        torch.tensor(NC),
        torch.tensor(NR),
    )


def approx(values: list[float]) -> typing.Any:
    return pytest.approx(values, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- hand-computed values


def test_margins_by_hand() -> None:
    p = pairs()
    assert margins() == [2.5, -2.0, 0.0]
    assert p.margin().tolist() == approx(margins())
    assert p.average_margin().tolist() == approx(average_margins())


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sigmoid_with_label_smoothing_by_hand(eps: float) -> None:
    out = compute_loss(pairs(), objective("sigmoid", BETA, label_smoothing=eps))
    expected = [(1 - eps) * softplus(-BETA * h) + eps * softplus(BETA * h) for h in margins()]
    assert out.losses.tolist() == approx(expected)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_by_hand(eps: float) -> None:
    out = compute_loss(pairs(), objective("robust", BETA, label_smoothing=eps))
    expected = [
        ((1 - eps) * softplus(-BETA * h) - eps * softplus(BETA * h)) / (1 - 2 * eps)
        for h in margins()
    ]
    assert out.losses.tolist() == approx(expected)


def test_ipo_by_hand_uses_per_token_averages() -> None:
    out = compute_loss(pairs(), objective("ipo", BETA))
    expected = [(h - 1 / (2 * BETA)) ** 2 for h in average_margins()]
    assert out.losses.tolist() == approx(expected)
    # Not the summed margins: (2.5 - 5)^2 = 6.25 would be the unnormalised value of pair 0.
    assert out.losses[0].item() != pytest.approx(6.25)


def test_hinge_by_hand() -> None:
    out = compute_loss(pairs(), objective("hinge", 0.5))
    # 1 - 0.5 * h for h = 2.5, -2, 0, floored at 0.
    assert out.losses.tolist() == approx([0.0, 2.0, 1.0])


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_simpo_by_hand(gamma: float) -> None:
    out = compute_loss(pairs(reference=False), objective("simpo", 2.0, gamma=gamma))
    rows = zip(PC, PR, NC, NR, strict=True)
    expected = [softplus(-(2.0 * (pc / nc - pr / nr) - gamma)) for pc, pr, nc, nr in rows]
    assert out.losses.tolist() == approx(expected)
    # SimPO ignores reference log-probs altogether.
    with_ref = compute_loss(pairs(reference=True), objective("simpo", 2.0, gamma=gamma))
    assert with_ref.losses.tolist() == approx(expected)


def test_sft_term_is_the_per_token_nll_of_the_chosen_answer() -> None:
    plain = compute_loss(pairs(), objective("sigmoid", BETA))
    rpo = compute_loss(pairs(), objective("sigmoid", BETA, sft_weight=0.25))
    nll = [-pc / nc for pc, nc in zip(PC, NC, strict=True)]  # 2.5, 2, 1.6
    assert rpo.nll.tolist() == approx(nll)
    assert plain.nll.tolist() == approx(nll)  # logged even when the term is off
    expected = [loss + 0.25 * n for loss, n in zip(plain.losses.tolist(), nll, strict=True)]
    assert rpo.losses.tolist() == approx(expected)
    assert not rpo.nll.requires_grad


def test_rewards_are_beta_log_ratios_except_simpo() -> None:
    def scaled(a: list[float], b: list[float], by: typing.Callable) -> list[float]:
        return [BETA * by(x, y) for x, y in zip(a, b, strict=True)]

    for name in ("sigmoid", "robust", "ipo", "hinge"):
        out = compute_loss(pairs(), objective(name, BETA))
        assert out.chosen_rewards.tolist() == approx(scaled(PC, RC, float.__sub__))
        assert out.rejected_rewards.tolist() == approx(scaled(PR, RR, float.__sub__))
    simpo = compute_loss(pairs(reference=False), objective("simpo", BETA))
    assert simpo.chosen_rewards.tolist() == approx(scaled(PC, NC, lambda p, n: p / n))
    assert simpo.rejected_rewards.tolist() == approx(scaled(PR, NR, lambda p, n: p / n))


# ---------------------------------------------------------------- limits


def test_sigmoid_without_smoothing_is_the_papers_dpo_loss() -> None:
    # tests/plain_dpo.py writes the loss straight from the DPO paper, independently.
    p = pairs()
    ours = compute_loss(p, objective("sigmoid", BETA))
    losses, chosen, rejected = dpo_loss(
        p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected, BETA
    )
    torch.testing.assert_close(ours.losses, losses, rtol=0, atol=0)
    torch.testing.assert_close(ours.chosen_rewards, chosen, rtol=0, atol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected, rtol=0, atol=0)


def test_robust_without_flips_is_sigmoid() -> None:
    h = torch.linspace(-50, 50, 101, dtype=torch.float64)
    torch.testing.assert_close(robust_loss(h, 0.3, 0.0), sigmoid_loss(h, 0.3), rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_robust_is_unbiased_under_label_flips(eps: float) -> None:
    # The defining property: expected loss over flipped labels equals the clean DPO loss.
    h = torch.linspace(-30, 30, 61, dtype=torch.float64)
    expected = (1 - eps) * robust_loss(h, 0.2, eps) + eps * robust_loss(-h, 0.2, eps)
    torch.testing.assert_close(expected, sigmoid_loss(h, 0.2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "robust"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_ln2_when_policy_equals_reference(name: str, eps: float) -> None:
    logps = torch.tensor([-3.0, -120.0, 0.0])
    same = PairLogps(
        logps, logps - 1, logps.clone(), logps - 1, torch.tensor([1, 9, 0]), torch.tensor([2, 3, 1])
    )
    out = compute_loss(same, objective(name, 0.7, label_smoothing=eps))
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)


def test_other_variants_at_policy_equals_reference() -> None:
    logps = torch.tensor([-3.0, -12.0])
    counts = torch.tensor([3, 4])
    same = PairLogps(logps, logps - 2, logps.clone(), logps - 2, counts, counts)
    assert compute_loss(same, objective("ipo", 0.25)).losses.tolist() == pytest.approx([4.0, 4.0])
    assert compute_loss(same, objective("hinge", 0.25)).losses.tolist() == pytest.approx([1.0, 1.0])


def test_label_smoothing_minimum_is_at_a_finite_margin() -> None:
    # cDPO: d/dz [-(1-eps) log s(z) - eps log s(-z)] = s(z) - (1 - eps), zero at z = logit(1-eps).
    eps, beta = 0.1, 0.5
    h_star = math.log((1 - eps) / eps) / beta
    h = torch.tensor([h_star], dtype=torch.float64, requires_grad=True)
    sigmoid_loss(h, beta, eps).sum().backward()
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_reference_free_zeroes_the_reference() -> None:
    policy = torch.tensor([-4.0, -9.0, -6.0, -5.0])  # [chosen; rejected] of 2 pairs
    counts = torch.tensor([2, 3, 3, 1])
    p = PairLogps.from_concatenated(policy, None, counts, 2)
    assert p.ref_chosen.tolist() == [0.0, 0.0] and p.ref_rejected.tolist() == [0.0, 0.0]
    out = compute_loss(p, objective("sigmoid", 0.5))
    # Margins pc - pr: -4 + 6 = 2, -9 + 5 = -4.
    assert out.losses.tolist() == pytest.approx([softplus(-1.0), softplus(2.0)], rel=1e-6)


def test_empty_completions_give_finite_values() -> None:
    zero = torch.zeros(2)
    p = PairLogps(zero, zero, zero, zero, torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    for name in VARIANTS:
        out = compute_loss(p, objective(name, 0.1, sft_weight=1.0))
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.nll).all(), name


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradients_raise_chosen_and_lower_rejected(name: str) -> None:
    # Pairs 1 (h = -2) and 2 (h = 0) are below every variant's target margin.
    p = pairs(requires_grad=True, reference=name not in REFERENCE_FREE)
    extra = {"label_smoothing": 0.1} if name in LABEL_SMOOTHED else {}
    compute_loss(p, objective(name, 0.5, **extra)).losses[1:].sum().backward()
    assert (p.policy_chosen.grad[1:] < 0).all() and (p.policy_rejected.grad[1:] > 0).all()


def test_ipo_pushes_an_overshooting_margin_back_and_hinge_stops() -> None:
    beta = 0.5  # IPO target h_avg = 1, hinge inactive once h >= 2
    counts = torch.tensor([1])
    pc = torch.tensor([0.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    ref = torch.tensor([0.0])
    p = PairLogps(pc, pr, ref, ref, counts, counts)  # h = h_avg = 5
    compute_loss(p, objective("ipo", beta)).losses.sum().backward()
    assert pc.grad.item() == pytest.approx(2 * (5 - 1)) and pr.grad.item() == pytest.approx(-8)
    pc.grad = pr.grad = None
    compute_loss(p, objective("hinge", beta)).losses.sum().backward()
    assert pc.grad.item() == 0 and pr.grad.item() == 0


def test_sft_gradient_on_the_chosen_log_prob() -> None:
    p = pairs(requires_grad=True)
    compute_loss(p, objective("hinge", 0.01, sft_weight=2.0)).losses.sum().backward()
    # Hinge part: -beta per pair (all margins below 1/beta); NLL part: -2 / nc.
    expected = [-0.01 - 2.0 / nc for nc in NC]
    assert p.policy_chosen.grad.tolist() == approx(expected)


# ---------------------------------------------------------------- registry and settings


def test_every_variant_has_its_formula() -> None:
    assert LABEL_SMOOTHED <= set(VARIANTS) and REFERENCE_FREE <= set(VARIANTS)
    for name in VARIANTS:  # compute_loss would raise for a name without one
        compute_loss(pairs(reference=name not in REFERENCE_FREE), objective(name, BETA))


PLAIN = read_yaml(REPO / "params.yaml")["loss"]  # plain DPO, every key a new setting adds too


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"variant": "dpo"}, "loss.variant must be one of"),
        ({"variant": "robust", "label_smoothing": 0.5}, "loss.label_smoothing must be in"),
        ({"label_smoothing": -0.1}, "loss.label_smoothing must be in"),
        ({"variant": "ipo", "label_smoothing": 0.1}, "loss.label_smoothing applies to"),
        ({"gamma": 0.5}, "loss.gamma is SimPO"),
        ({"variant": "simpo", "gamma": -1.0, "reference_free": True}, "loss.gamma must be >= 0"),
        ({"sft_weight": -1.0}, "loss.sft_weight must be >= 0"),
        ({"variant": "simpo"}, "reference-free"),
    ],
)
def test_settings_errors_name_the_setting(settings: dict, message: str) -> None:
    """Checked once, when params are parsed: compute_loss trusts what it is given."""
    with pytest.raises(ParamsError, match=message):
        parse_section("loss", {**PLAIN, **settings}, LossParams)


def test_valid_settings_pass() -> None:
    for settings in (
        {"variant": "simpo", "gamma": 0.5, "sft_weight": 1.0, "reference_free": True},
        {"label_smoothing": 0.2, "reference_free": True},
        {"variant": "robust", "label_smoothing": 0.2},
    ):
        parse_section("loss", {**PLAIN, **settings}, LossParams)


def test_pair_logps_rejects_mismatched_shapes() -> None:
    a, b = torch.zeros(3), torch.zeros(2)
    with pytest.raises(ValueError, match="six"):
        PairLogps(a, a, a, b, a, a)
    with pytest.raises(ValueError, match="expected"):
        PairLogps.from_concatenated(torch.zeros(5), None, torch.zeros(5), 2)


def test_the_loss_settings_import_no_torch() -> None:
    # params.py validates them, and stages such as download never load torch.
    import subprocess
    import sys

    code = "import sys, pipeline.params; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
