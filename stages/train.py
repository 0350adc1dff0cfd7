"""train: models/base + data/tokenized/train -> models/policy/ (HF folder + MLflow run id),
metrics/train.json, plots/train.csv. Resumes from checkpoints/train/ (and continues the same
MLflow run) when a run with the same inputs was killed."""

import dataclasses
from pathlib import Path

import datasets
import mlflow
from transformers import AutoTokenizer

from pipeline import checkpoint, reference, tracking
from pipeline.atomic import atomic_dir, write_json_atomic
from pipeline.csvlog import write_csv_atomic
from pipeline.modeling import Runtime, freeze, load_causal_lm, pad_token_id, resolve_runtime
from pipeline.params import Params, load_params, save_resolved
from pipeline.paths import (
    CHECKPOINTS,
    DATA_REFERENCE,
    DATA_TOKENIZED,
    METRICS,
    MODEL_BASE,
    MODEL_POLICY,
    PLOTS,
    REPORTS,
)
from pipeline.reference import ReferenceScores
from pipeline.scoring import CompletionScorer
from pipeline.trainer import LOG_KEYS, TrainResult, train_policy

# Settings that do not change the maths; a checkpoint stays resumable when only these change.
NOT_IN_FINGERPRINT = ("log_every", "save_every")


def summary(result: TrainResult) -> dict[str, object]:
    return {
        "steps": result.steps,
        "final_loss": result.log[-1]["loss"],
        "epoch_losses": result.epoch_losses,
        "train_seconds": round(result.train_seconds, 2),
        "pairs_per_s": round(result.pairs_per_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
    }


def reference_scores(params: Params, runtime: Runtime, n_pairs: int) -> ReferenceScores:
    """The reference stage's cache (checked against base model, data and runtime), or a frozen
    copy of the base model when train.cached_reference is false."""
    if params.train.cached_reference:
        identity = reference.describe(MODEL_BASE, DATA_TOKENIZED / "train", runtime)
        logps = reference.load(DATA_REFERENCE / "train", identity, n_pairs)
        return reference.CachedReference(logps, runtime.device)
    model = load_causal_lm(MODEL_BASE, runtime, params.model.trust_remote_code)
    return reference.ModelReference(freeze(CompletionScorer(model)), runtime)


def main() -> None:
    params = load_params()
    runtime = resolve_runtime(params.train.device)
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    pad = pad_token_id(tokenizer)
    dataset = datasets.load_from_disk(str(DATA_TOKENIZED / "train"))
    policy = load_causal_lm(MODEL_BASE, runtime, trust)
    reference = reference_scores(params, runtime, len(dataset))
    config = {
        k: v for k, v in dataclasses.asdict(params.train).items() if k not in NOT_IN_FINGERPRINT
    }
    run_key = checkpoint.fingerprint(config, MODEL_BASE, DATA_TOKENIZED / "train")
    found = checkpoint.latest(CHECKPOINTS, run_key)
    previous_run = checkpoint.read_extra(found).get("run_id") if found else None
    run_id = tracking.start_training_run(params, str(runtime.device), previous_run)
    for name in ("tokenize", "subsample"):
        if (REPORTS / f"{name}.json").is_file():
            mlflow.log_artifact(str(REPORTS / f"{name}.json"), artifact_path="reports")
    print(
        f"train: {len(dataset)} pairs on {runtime.device} (autocast {runtime.autocast_dtype}), "
        f"{sum(p.numel() for p in policy.parameters()):,} params, MLflow run {run_id}"
    )
    result = train_policy(
        CompletionScorer(policy),
        reference,
        dataset,
        params.train,
        runtime,
        pad,
        CHECKPOINTS,
        run_key,
        on_log=tracking.log_step,
        extra={"run_id": run_id},
    )
    with atomic_dir(MODEL_POLICY) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_resolved(params, tmp, "train")
        tracking.write_run_file(Path(tmp), run_id)
    write_csv_atomic(PLOTS / "train.csv", result.log, LOG_KEYS)
    write_json_atomic(METRICS / "train.json", summary(result))
    tracking.log_flat_metrics(summary(result), "train_summary/")
    mlflow.end_run()


if __name__ == "__main__":
    main()
