"""How long a sequence the model can read: a learned position table (GPT-2's) ends; rotary and
ALiBi positions do not. Checked before a stage feeds the model its longest sequences, so that a
too-long setting is refused in one line, not met as an IndexError deep in the forward."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from pipeline.stage_io import StageError


def learned_positions(config: PretrainedConfig, trust_remote_code: bool) -> int | None:
    """How many positions a model with a learned position table reads (GPT-2's n_positions),
    or None where positions are computed (rotary, ALiBi) and no table runs out. Found by
    building the model on the meta device (no weights, no memory): a probe, not a family list."""
    limit = getattr(config, "max_position_embeddings", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    inputs = model.get_input_embeddings()
    tables = (
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m is not inputs and m.num_embeddings == limit
    )
    return limit if next(tables, None) is not None else None


def check_positions(
    config: PretrainedConfig, lengths: Mapping[str, int], trust_remote_code: bool
) -> None:
    """Refuse lengths (params key -> tokens) a learned position table cannot index, in one line
    naming the keys, before any work (past the table the forward fails with an IndexError)."""
    limit = learned_positions(config, trust_remote_code)
    over = {key: n for key, n in lengths.items() if limit is not None and n > limit}
    if over:
        said = ", ".join(f"{key} = {n}" for key, n in over.items())
        raise StageError(
            f"{said}: the model reads at most {limit} tokens (its learned position table, "
            f"{type(config).__name__}); lower {' and '.join(over)} to {limit} or less"
        )
