"""eval_sets: models/base + eval.datasets -> data/eval_sets/<name>/ (each extra held-out set's
pairs, token ids and reference log-probs) and reports/eval_sets.json. Its own stage, so the
reference scores of an extra set are computed once and an experiment that changes train.* or
loss.* reuses them; with no extra set it writes an empty folder and loads nothing."""

from transformers import AutoTokenizer

from pipeline.evaluate.sets import prepare_set
from pipeline.model.loading import freeze, pad_token_id, resolve_runtime
from pipeline.model.scoring import load_scorer
from pipeline.params import load_params, save_resolved
from pipeline.resources import stage_share
from pipeline.stage_io import (
    DATA_EVAL_SETS,
    MODEL_BASE,
    REPORTS,
    atomic_dir,
    run_stage,
    write_json_atomic,
)


def main() -> None:
    params = load_params()
    reports = {}
    with atomic_dir(DATA_EVAL_SETS) as tmp:
        if params.eval.datasets:
            runtime = resolve_runtime(params.eval.device)  # where evaluate scores the policy
            trust = params.model.trust_remote_code
            tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
            quantize = params.train.lora.quantize
            with stage_share(params.eval.device):
                model = freeze(load_scorer(MODEL_BASE, runtime, trust, quantize))
                for spec in params.eval.datasets:
                    reports[spec.name] = prepare_set(
                        spec,
                        params,
                        tokenizer,
                        model,
                        runtime,
                        pad_token_id(tokenizer),
                        tmp / spec.name,
                    )
                    kept = reports[spec.name]["tokenize"]["pairs_kept"]
                    print(f"{spec.name}: {kept} held-out pairs of {spec.dataset} ({spec.split})")
        save_resolved(params, tmp, "eval_sets")
    write_json_atomic(REPORTS / "eval_sets.json", reports)


if __name__ == "__main__":
    run_stage(main)
