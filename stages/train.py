"""train: models/base + data/tokenized/train -> models/policy/ (HF folder + MLflow run id),
metrics/train.json, plots/train.csv. Resumes from checkpoints/train/<run key>/ at the repository
root (and continues the same MLflow run) when a run with the same inputs was stopped, whichever
copy of the repository it ran in; the checkpoints go once the run completes. With
train.nproc > 1 it claims that many GPUs and starts itself under torchrun, one process per GPU
(DDP or FSDP)."""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import mlflow
from transformers import AutoTokenizer

from pipeline.data.schema import load_tokenized
from pipeline.model.loading import pad_token_id, resolve_runtime
from pipeline.params import Params, load_params, save_resolved
from pipeline.resources import rank_environment, stage_share
from pipeline.stage_io import (
    CHECKPOINTS,
    DATA_TOKENIZED,
    METRICS,
    MODEL_BASE,
    MODEL_POLICY,
    PLOTS,
    REPORTS,
    atomic_dir,
    repo_root,
    run_stage,
    write_csv_atomic,
    write_json_atomic,
)
from pipeline.track import runs
from pipeline.train import distributed, run
from pipeline.train.adapters import trainable_parameters
from pipeline.train.checkpoint import resumable_extra
from pipeline.train.loop import LOG_KEYS, Resume, train_policy


def main() -> None:
    params = load_params()
    nproc = params.train.nproc
    if nproc > 1 and "LOCAL_RANK" not in os.environ:  # the launcher: claim, then start the ranks
        with stage_share(params.train.device, nproc) as share:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd = [*torchrun, f"--nproc_per_node={nproc}", "-m", "stages.train"]
            raise SystemExit(
                subprocess.run(cmd, env={**os.environ, **rank_environment(share)}).returncode
            )
    with stage_share(params.train.device) as share:
        train(params, share.rebalance)


def train(params: Params, every_step: Callable[[], None]) -> None:
    world, runtime = distributed.init_from_env(resolve_runtime(params.train.device))
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    dataset = load_tokenized(DATA_TOKENIZED / "train")
    scorer = run.load_policy(params, runtime)
    reference = run.reference_scores(params, runtime, len(dataset), scorer)
    key = run.run_key(params.train, MODEL_BASE, DATA_TOKENIZED / "train")
    checkpoints = repo_root() / CHECKPOINTS / key[:16]
    run_id, log_step = None, None
    if world.is_main:  # rank 0 alone talks to MLflow, continuing the run a checkpoint names
        previous = resumable_extra(checkpoints, key).get("run_id")
        run_id = runs.start_training_run(params, str(runtime.device), previous)
        log_step = runs.step_logger(run_id)
        runs.log_reports(REPORTS, ("tokenize", "subsample"))
        trainable = trainable_parameters(scorer)
        mlflow.log_param("train.trainable_parameters", trainable)
        print(
            f"train: {len(dataset)} pairs on {world.size} x {runtime.device} (autocast "
            f"{runtime.autocast_dtype}), {trainable:,} trainable params, MLflow run {run_id}"
        )
    wrapped = distributed.wrap(scorer, world, runtime, params.train.parallel)
    result = train_policy(
        wrapped,
        reference,
        dataset,
        params.train,
        runtime,
        pad_token_id(tokenizer),
        Resume(checkpoints, key, {"run_id": run_id}),
        on_log=log_step,
        every_step=every_step,
    )
    state = run.policy_state(wrapped)  # a collective under FSDP: every rank gathers
    if world.is_main:
        with atomic_dir(MODEL_POLICY) as tmp:
            dtype, base = run.base_dtype(MODEL_BASE, trust), run.BaseFolder(MODEL_BASE, trust)
            run.save_policy(tmp, scorer, tokenizer, state, dtype, base)
            save_resolved(params, tmp, "train")
            runs.write_run_file(tmp, run_id)
        write_csv_atomic(PLOTS / "train.csv", result.log, LOG_KEYS)
        figures = run.summary(result)
        write_json_atomic(REPORTS / "train.json", figures)
        write_json_atomic(METRICS / "train.json", {k: figures[k] for k in run.HEADLINE})
        runs.log_flat_metrics(figures, "train_summary/")
        mlflow.end_run()
    distributed.barrier(world)
    if world.is_main:  # the run is complete: nothing left to resume
        shutil.rmtree(checkpoints, ignore_errors=True)
    distributed.shutdown(world)


if __name__ == "__main__":
    run_stage(main)
