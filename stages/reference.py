"""reference: models/base + data/tokenized -> data/reference/{train,eval}/ (the frozen reference
model's completion log-probs of every pair, with a fingerprint of what they were computed from).

Train and evaluate read them instead of running a second model. A change of lr or any other train
setting leaves this stage's inputs alone, so `dvc exp run -S train.lr=...` restores it from cache.
With train.lora.quantize: nf4 both splits are scored by the 4-bit base the policy trains on:
DPO's reference must be the policy's own starting point (docs/lora.md).
"""

from transformers import AutoTokenizer

from pipeline.model.loading import pad_token_id, resolve_runtime
from pipeline.model.precompute import check_devices, score_split
from pipeline.params import load_params, save_resolved
from pipeline.resources import stage_share
from pipeline.stage_io import DATA_REFERENCE, MODEL_BASE, atomic_dir, run_stage


def main() -> None:
    params = load_params()
    check_devices(params)
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    with atomic_dir(DATA_REFERENCE) as tmp:
        # Each split is scored where the stage reading it runs: same device, same autocast.
        for split, device in (("train", params.train.device), ("eval", params.eval.device)):
            with stage_share(device):
                score_split(params, split, resolve_runtime(device), pad_token_id(tokenizer), tmp)
        save_resolved(params, tmp, "reference")


if __name__ == "__main__":
    run_stage(main)
