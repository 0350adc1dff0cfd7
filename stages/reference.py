"""reference: models/base + data/tokenized -> data/reference/{train,eval}/ (the frozen reference
model's completion log-probs of every pair, with a fingerprint of what they were computed from).

Train and evaluate read them instead of running a second model. A change of lr or any other train
setting leaves this stage's inputs alone, so `dvc exp run -S train.lr=...` restores it from cache.
With train.lora.quantize: nf4 both splits are scored by the 4-bit base the policy trains on:
DPO's reference must be the policy's own starting point (docs/lora.md).
"""

from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from pipeline.data.schema import load_tokenized
from pipeline.model import reference
from pipeline.model.loading import (
    Runtime,
    check_quantize,
    freeze,
    pad_token_id,
    resolve_runtime,
)
from pipeline.model.scoring import load_scorer, score_pairs
from pipeline.params import Params, load_params, save_resolved
from pipeline.resources import stage_share
from pipeline.stage_io import (
    DATA_REFERENCE,
    DATA_TOKENIZED,
    MODEL_BASE,
    atomic_dir,
    run_stage,
)


def main() -> None:
    params = load_params()
    check_devices(params)
    tokenizer = AutoTokenizer.from_pretrained(
        MODEL_BASE, trust_remote_code=params.model.trust_remote_code
    )
    with atomic_dir(DATA_REFERENCE) as tmp:
        # Each split is scored where the stage reading it runs: same device, same autocast.
        for split, device in (("train", params.train.device), ("eval", params.eval.device)):
            with stage_share(device):
                score_split(params, split, resolve_runtime(device), pad_token_id(tokenizer), tmp)
        save_resolved(params, tmp, "reference")


def check_devices(params: Params) -> None:
    """Refuse a 4-bit base off CUDA for either split before any work (QLoRA needs a GPU)."""
    if params.train.lora.quantize == "none":
        return
    for key, device in (("train.device", params.train.device), ("eval.device", params.eval.device)):
        check_quantize(params.train.lora.quantize, resolve_runtime(device), key)


def score_split(params: Params, split: str, runtime: Runtime, pad: int, out: Path) -> None:
    """One split's reference log-probs and their fingerprint, into `out / split`."""
    quantize = params.train.lora.quantize
    model = freeze(load_scorer(MODEL_BASE, runtime, params.model.trust_remote_code, quantize))
    dataset = load_tokenized(DATA_TOKENIZED / split)
    chosen, rejected = score_pairs(
        model, dataset, params.reference.batch_size, runtime, pad, f"reference {split}"
    )
    identity = reference.describe(MODEL_BASE, DATA_TOKENIZED / split, runtime, quantize)
    reference.save(out / split, np.stack([chosen, rejected], axis=1), identity)
    print(f"{split}: reference log-probs of {len(dataset)} pairs on {runtime.device}")


if __name__ == "__main__":
    run_stage(main)
