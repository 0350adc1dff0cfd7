"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: train a tiny model with
DDP or FSDP, with or without LoRA adapters (DDP also with compiled layers), over gloo, let rank 0
write the per-step log, then resume from the final checkpoint (a collective state gather and
scatter under FSDP), gather the full weights and, with adapters, save the policy as the train
stage does (adapter + merged)."""

import json
import sys
from pathlib import Path

import torch

from pipeline.model.loading import Runtime
from pipeline.train import distributed, export
from tests.helpers import NoTokenizer, compile_layers_aot_eager, fit, random_pairs
from tests.test_distributed import PARAMS, PER_RANK_BATCH, policy_and_reference

if __name__ == "__main__":
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    world, runtime = distributed.init_from_env(Runtime(torch.device("cpu"), None))
    lora, compiled = strategy.endswith("-lora"), "-compile" in strategy
    strategy = strategy.split("-")[0]
    params = PARAMS.__class__(
        **{**PARAMS.__dict__, "batch_size": PER_RANK_BATCH, "parallel": strategy}
    )
    runs = []
    for _ in range(2):  # the second run finds the final checkpoint and restores it
        scorer, reference = policy_and_reference(lora, runtime)
        if compiled:
            compile_layers_aot_eager(scorer.model)
        policy = distributed.wrap(scorer, world, runtime, strategy)
        result = fit(
            policy,
            reference,
            random_pairs(22),
            params,
            runtime,
            0,
            out.parent / "ckpt",
            "key",
        )
        runs.append(result.log)
    state = distributed.full_model_state(policy)
    if world.is_main:
        checksum = float(sum(t.double().abs().sum() for t in state.values()))
        out.write_text(
            json.dumps(
                {
                    "world": world.size,
                    "log": runs[0],
                    "resumed_log": runs[1],
                    "sharded": distributed.is_sharded(policy),
                    "weights_abs_sum": checksum,
                }
            )
        )
    if lora:  # after the checksum: merging in place changes the weights
        state = export.policy_state(policy)  # the train stage's gather: a collective in FSDP
        if world.is_main:
            export.save_policy(
                out.parent / "policy",
                scorer,
                NoTokenizer(),
                state,
                torch.float32,
                out.parent / "base",
            )
    distributed.shutdown(world)
