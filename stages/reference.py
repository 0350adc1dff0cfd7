"""reference: models/base + data/tokenized -> data/reference/{train,eval}/ (the frozen reference
model's completion log-probs of every pair, with a fingerprint of what they were computed from).

Train and evaluate read them instead of running a second model. A change of lr or any other train
setting leaves this stage's inputs alone, so `dvc exp run -S train.lr=...` restores it from cache.
"""

import datasets
import numpy as np
from transformers import AutoTokenizer

from pipeline.model import reference
from pipeline.model.loading import freeze, pad_token_id, resolve_runtime
from pipeline.model.scoring import load_scorer, score_pairs
from pipeline.params import Params, load_params, save_resolved
from pipeline.resources import stage_share
from pipeline.stage_io import (
    DATA_REFERENCE,
    DATA_TOKENIZED,
    MODEL_BASE,
    atomic_dir,
    repo_root,
    run_stage,
)


def main() -> None:
    params = load_params()
    with stage_share(repo_root(), resolve_runtime(params.train.device).device.type):
        score_reference(params)


def score_reference(params: Params) -> None:
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    pad = pad_token_id(tokenizer)
    with atomic_dir(DATA_REFERENCE) as tmp:
        # Each split is scored where the stage reading it runs: same device, same autocast.
        for split, device in (("train", params.train.device), ("eval", params.eval.device)):
            runtime = resolve_runtime(device)
            model = freeze(load_scorer(MODEL_BASE, runtime, trust))
            dataset = datasets.load_from_disk(str(DATA_TOKENIZED / split))
            chosen, rejected = score_pairs(
                model, dataset, params.reference.batch_size, runtime, pad, f"reference {split}"
            )
            identity = reference.describe(MODEL_BASE, DATA_TOKENIZED / split, runtime)
            reference.save(tmp / split, np.stack([chosen, rejected], axis=1), identity)
            print(f"{split}: reference log-probs of {len(dataset)} pairs on {runtime.device}")
        save_resolved(params, tmp, "reference")


if __name__ == "__main__":
    run_stage(main)
