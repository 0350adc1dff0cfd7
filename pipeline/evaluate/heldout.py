"""A policy scored on this run's held-out pairs, and what makes two such scores comparable.

The evaluate stage scores the trained policy with it; the register stage scores the current
champion with it when the champion was evaluated on other pairs, so that the champion gate
always compares figures measured the same way on the same pairs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from pipeline.data.schema import load_tokenized
from pipeline.evaluate.metrics import evaluate_policy
from pipeline.fingerprint import fingerprint
from pipeline.model import reference
from pipeline.model.loading import Runtime, freeze, pad_token_id
from pipeline.model.scoring import load_scorer, score_pairs
from pipeline.objective.losses import LossOutput
from pipeline.params import Params
from pipeline.stage_io import DATA_REFERENCE, DATA_TOKENIZED, MODEL_BASE

EVAL_SPLIT = DATA_TOKENIZED / "eval"


def comparison_key(params: Params, runtime: Runtime) -> dict[str, str]:
    """What a held-out figure depends on besides the policy, as three hashes: the exact held-out
    pairs (token ids, so the data, its subsample and the prompt template), the base model (the
    reference every implicit reward is measured against), and how the pairs are scored (loss
    variant and its settings, device type and precision, a 4-bit reference). Equal keys:
    comparable figures."""
    scoring = {
        **dataclasses.asdict(params.loss),
        "quantize": params.train.lora.quantize,  # the 4-bit base's log-probs are another reference
        "device": runtime.device.type,
        "autocast": str(runtime.autocast_dtype),
    }
    return {
        "heldout_pairs": fingerprint({}, EVAL_SPLIT),
        "base_model": fingerprint({}, MODEL_BASE),
        "scoring": fingerprint(scoring),
    }


def score_heldout(
    policy_dir: Path,
    params: Params,
    runtime: Runtime,
    desc: str = "policy",
    split: Path = EVAL_SPLIT,
    cache: Path = DATA_REFERENCE / "eval",
) -> tuple[dict[str, Any], LossOutput]:
    """Every held-out metric of the policy saved in `policy_dir` (an HF folder) on the tokenized
    `split`, against the reference log-probs cached in `cache`, and its per-pair results."""
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=trust)
    dataset = load_tokenized(split)
    # The reference side comes from the reference stage, computed once per base model and data.
    quantize = params.train.lora.quantize  # the reference a 4-bit policy trained against
    identity = reference.describe(MODEL_BASE, split, runtime, quantize)
    cached = reference.load(cache, identity, len(dataset)).astype(np.float64)
    policy = freeze(load_scorer(policy_dir, runtime, trust))
    policy_scores = score_pairs(
        policy, dataset, params.eval.batch_size, runtime, pad_token_id(tokenizer), desc
    )
    return evaluate_policy(policy_scores, (cached[:, 0], cached[:, 1]), dataset, params.loss)
