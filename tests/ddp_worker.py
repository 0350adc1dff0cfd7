"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: train a tiny model with
DDP over gloo and let rank 0 write the per-step log."""

import json
import sys
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.modeling import Runtime, freeze
from pipeline.reference import ModelReference
from pipeline.scoring import CompletionScorer
from pipeline.trainer import train_policy
from tests.helpers import random_pairs, tiny_qwen3
from tests.test_distributed import PARAMS, PER_RANK_BATCH

if __name__ == "__main__":
    out = Path(sys.argv[1])
    world, runtime = distributed.init_from_env(Runtime(torch.device("cpu"), None))
    policy = distributed.wrap(CompletionScorer(tiny_qwen3()), world, runtime)
    reference = ModelReference(freeze(CompletionScorer(tiny_qwen3())), runtime)
    params = PARAMS.__class__(**{**PARAMS.__dict__, "batch_size": PER_RANK_BATCH})
    result = train_policy(
        policy, reference, random_pairs(22), params, runtime, 0, out.parent / "ckpt", "key"
    )
    if world.is_main:
        out.write_text(json.dumps({"world": world.size, "log": result.log}))
    distributed.shutdown(world)
