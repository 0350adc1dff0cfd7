"""train: models/base + data/tokenized/train -> models/policy/ (HF folder + MLflow run id),
metrics/train.json, plots/train.csv. Resumes from checkpoints/train/ (and continues the same
MLflow run) when a run with the same inputs was killed."""

import dataclasses
from pathlib import Path
from typing import Any

import datasets
import mlflow
import torch
from transformers import AutoTokenizer

from pipeline import checkpoint, distributed, reference, tracking
from pipeline.atomic import atomic_dir, write_json_atomic
from pipeline.csvlog import write_csv_atomic
from pipeline.modeling import Runtime, freeze, load_scorer, pad_token_id, resolve_runtime
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
from pipeline.trainer import LOG_KEYS, TrainResult, train_policy

# Settings that do not change the maths; a checkpoint stays resumable when only these change.
# (nproc does: batch_size is per process, so it sets the global batch.)
NOT_IN_FINGERPRINT = ("log_every", "save_every", "parallel")


def summary(result: TrainResult) -> dict[str, object]:
    return {
        "steps": result.steps,
        "final_loss": result.log[-1]["loss"],
        "epoch_losses": result.epoch_losses,
        "train_seconds": round(result.train_seconds, 2),
        "pairs_per_s": round(result.pairs_per_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        **result.padding,
    }


def reference_scores(params: Params, runtime: Runtime, n_pairs: int) -> ReferenceScores | None:
    """The reference stage's cache (checked against base model, data and runtime), a frozen
    copy of the base model when train.cached_reference is false, None when reference-free."""
    if params.train.reference_free:
        return None
    if params.train.cached_reference:
        identity = reference.describe(MODEL_BASE, DATA_TOKENIZED / "train", runtime)
        logps = reference.load(DATA_REFERENCE / "train", identity, n_pairs)
        return reference.CachedReference(logps, runtime.device)
    model = load_scorer(MODEL_BASE, runtime, params.model.trust_remote_code)
    return reference.ModelReference(freeze(model), runtime)


def start_run(params: Params, device: str, run_key: str) -> str | None:
    """Rank 0 opens the MLflow run (continuing the one a resumed checkpoint names)."""
    found = checkpoint.latest(CHECKPOINTS, run_key)
    previous_run = checkpoint.read_extra(found).get("run_id") if found else None
    run_id = tracking.start_training_run(params, device, previous_run)
    for name in ("tokenize", "subsample"):
        if (REPORTS / f"{name}.json").is_file():
            mlflow.log_artifact(str(REPORTS / f"{name}.json"), artifact_path="reports")
    return run_id


def write_outputs(
    params: Params,
    policy: torch.nn.Module,
    tokenizer: Any,
    result: TrainResult,
    run_id: str,
    scorer_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """`scorer_state`: the full weights gathered from FSDP shards (keys of the CompletionScorer,
    whose `model.` prefix is the HF model), None when `policy` holds them itself."""
    state = None
    if scorer_state is not None:
        state = {k.removeprefix("model."): v for k, v in scorer_state.items()}
    with atomic_dir(MODEL_POLICY) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(tmp)
        save_resolved(params, tmp, "train")
        tracking.write_run_file(Path(tmp), run_id)
    write_csv_atomic(PLOTS / "train.csv", result.log, LOG_KEYS)
    write_json_atomic(METRICS / "train.json", summary(result))
    tracking.log_flat_metrics(summary(result), "train_summary/")
    mlflow.end_run()


def main() -> None:
    params = load_params()
    world, runtime = distributed.init_from_env(resolve_runtime(params.train.device))
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    dataset = datasets.load_from_disk(str(DATA_TOKENIZED / "train"))
    scorer = load_scorer(MODEL_BASE, runtime, trust)
    policy = scorer.model  # the HF model inside, saved at the end
    reference = reference_scores(params, runtime, len(dataset))
    config = {
        k: v for k, v in dataclasses.asdict(params.train).items() if k not in NOT_IN_FINGERPRINT
    }
    # Checkpoints hold full states: a DDP run may resume under FSDP and the other way round.
    run_key = checkpoint.fingerprint(config, MODEL_BASE, DATA_TOKENIZED / "train")
    run_id = start_run(params, str(runtime.device), run_key) if world.is_main else None
    if world.is_main:
        print(
            f"train: {len(dataset)} pairs on {world.size} x {runtime.device} (autocast "
            f"{runtime.autocast_dtype}), {sum(p.numel() for p in policy.parameters()):,} "
            f"params, MLflow run {run_id}"
        )
    wrapped = distributed.wrap(scorer, world, runtime, params.train.parallel)
    result = train_policy(
        wrapped,
        reference,
        dataset,
        params.train,
        runtime,
        pad_token_id(tokenizer),
        CHECKPOINTS,
        run_key,
        on_log=tracking.log_step,
        extra={"run_id": run_id},
    )
    # Under FSDP every rank holds a shard: gather the full weights (all ranks) before rank 0 saves.
    state = distributed.full_model_state(wrapped) if distributed.is_sharded(wrapped) else None
    if world.is_main:
        write_outputs(params, policy, tokenizer, result, run_id, state)
    distributed.barrier(world)
    distributed.shutdown(world)


if __name__ == "__main__":
    main()
