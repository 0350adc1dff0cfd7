"""Names and setting rules of the DPO loss variants, without torch.

`pipeline.objective.losses` holds the formulas; this module holds what configuration needs to know
about them, so that pipeline/params.py can validate `train.*` at parse time without importing torch
(stages such as download and subsample never load it).
"""

from __future__ import annotations

from typing import Literal, get_args

#: The variant names `pipeline.objective.losses.LOSSES` knows, for typed configuration.
LossName = Literal["sigmoid", "robust", "ipo", "hinge", "simpo"]

#: Variants that read `label_smoothing` (as the smoothing eps, resp. the label flip rate).
LABEL_SMOOTHED: frozenset[str] = frozenset({"sigmoid", "robust"})
#: Variants defined without a reference model: their rewards are beta * average policy log-prob.
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})


def check_settings(
    name: str,
    *,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    sft_weight: float = 0.0,
    reference_free: bool | None = None,
) -> None:
    """Raise ValueError, message starting with the setting's name, for a combination no variant
    would use as meant.

    A setting the chosen variant ignores is an error rather than a silent no-op. `reference_free`
    is checked only when given (the loss functions cannot see it).
    """
    if name not in get_args(LossName):
        raise ValueError(f"loss must be one of {sorted(get_args(LossName))}, got {name!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and name not in LABEL_SMOOTHED:
        raise ValueError(f"label_smoothing applies to {sorted(LABEL_SMOOTHED)} only, not {name}")
    if gamma < 0.0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if gamma and name != "simpo":
        raise ValueError(f"gamma is SimPO's target margin and applies to simpo only, not {name}")
    if sft_weight < 0.0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    if reference_free is False and name in REFERENCE_FREE:
        raise ValueError(f"loss {name} is reference-free: set reference_free to true")
