"""The train stage around the recipe: what it loads from the workspace and what it writes there.

`stage_recipe` claims this process's share of the machine, joins torchrun's process group when
there is one, loads models/base as the policy (LoRA adapters when asked) and its reference, the
tokenized train pairs, opens the MLflow run (rank 0) and returns the `DPORecipe`, resumed from
`checkpoints/train/<run key>/` at the repository root when a run with the same inputs was
stopped. `save_outputs` writes models/policy and the figures, then drops the checkpoints. The
bench builds its runs with the same functions (`load_policy`, `load_reference`), also on a GPU
machine without MLflow: only the two stage functions import it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

from transformers import AutoTokenizer

from pipeline.data.schema import load_tokenized
from pipeline.model import reference
from pipeline.model.loading import (
    Runtime,
    check_quantize,
    compile_layers,
    enable_activation_checkpointing,
    freeze,
    pad_token_id,
    resolve_runtime,
)
from pipeline.model.scoring import CompletionScorer, load_scorer
from pipeline.params import Params, save_resolved
from pipeline.resources import rank_environment, stage_share
from pipeline.stage_io import (
    CHECKPOINTS,
    DATA_REFERENCE,
    DATA_TOKENIZED,
    METRICS,
    MODEL_BASE,
    MODEL_POLICY,
    PLOTS,
    REPORTS,
    atomic_dir,
    repo_root,
    write_csv_atomic,
    write_json_atomic,
)
from pipeline.train import checkpoint, distributed, export
from pipeline.train.adapters import AdaptersOffReference, add_adapters, trainable_parameters
from pipeline.train.recipe import LOG_KEYS, DPORecipe, Hooks, Inputs

TRAIN_SPLIT = DATA_TOKENIZED / "train"
# What metrics/train.json holds for `dvc exp show`; the whole summary goes to reports/ and MLflow.
HEADLINE = ("final_loss", "epoch_losses", "steps", "pairs_per_s", "padded_share")


def start_ranks(params: Params) -> int:
    """Claim train.nproc GPUs and run the train stage under torchrun, one process per GPU."""
    nproc = params.train.nproc
    with stage_share(params.train.device, nproc) as share:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*torchrun, f"--nproc_per_node={nproc}", "-m", "stages.train"]
        return subprocess.run(cmd, env={**os.environ, **rank_environment(share)}).returncode


def load_policy(params: Params, runtime: Runtime) -> CompletionScorer:
    """models/base as the trainable policy: fp32 master weights, or a 4-bit base under fp32
    adapters (train.lora.quantize: nf4); activation checkpointing and compiled layers when
    asked."""
    lora = params.train.lora
    check_quantize(lora.quantize, runtime, "train.device")
    scorer = load_scorer(MODEL_BASE, runtime, params.model.trust_remote_code, lora.quantize)
    if params.train.gradient_checkpointing:
        enable_activation_checkpointing(scorer.model)
    if lora.enabled:
        scorer.model = add_adapters(scorer.model, lora)
    if params.train.compile == "layers":
        compile_layers(scorer.model)
    return scorer


def load_reference(
    params: Params, runtime: Runtime, n_pairs: int, policy: CompletionScorer
) -> reference.ReferenceScores | None:
    """The reference stage's cache (checked against base model, data and runtime); when
    train.cached_reference is false, the policy with its adapters off (LoRA) or a frozen copy of
    the base model; None when loss.reference_free."""
    if params.loss.reference_free:
        return None
    if params.train.cached_reference:
        quantize = params.train.lora.quantize  # a 4-bit policy needs the 4-bit base's log-probs
        identity = reference.describe(MODEL_BASE, TRAIN_SPLIT, runtime, quantize)
        logps = reference.load(DATA_REFERENCE / "train", identity, n_pairs)
        return reference.CachedReference(logps, runtime.device)
    if params.train.lora.enabled:
        return AdaptersOffReference(policy, runtime)
    model = load_scorer(MODEL_BASE, runtime, params.model.trust_remote_code)
    return reference.ModelReference(freeze(model), runtime)


@contextlib.contextmanager
def stage_recipe(params: Params) -> Iterator[DPORecipe]:
    """The train stage's recipe, on this process's share of the machine while it lasts."""
    import mlflow

    from pipeline.track import runs

    with stage_share(params.train.device) as share:
        world, runtime = distributed.init_from_env(resolve_runtime(params.train.device))
        dataset = load_tokenized(TRAIN_SPLIT)
        scorer = load_policy(params, runtime)
        ref = load_reference(params, runtime, len(dataset), scorer)
        key = checkpoint.run_key(params.train, params.loss, MODEL_BASE, TRAIN_SPLIT)
        folder = repo_root() / CHECKPOINTS / key[:16]  # the real root, whichever copy DVC runs
        run_id, on_log = None, None
        if world.is_main:  # rank 0 alone talks to MLflow, continuing the run a checkpoint names
            previous = checkpoint.resumable_run_id(folder, key)
            run_id = runs.start_training_run(params, str(runtime.device), previous)
            on_log = runs.step_logger(run_id)
            runs.log_split(TRAIN_SPLIT, params, "training")
            runs.log_reports(REPORTS, ("tokenize", "subsample"))
            trainable = trainable_parameters(scorer)
            mlflow.log_param("train.trainable_parameters", trainable)
            print(
                f"train: {len(dataset)} pairs on {world.size} x {runtime.device} (autocast "
                f"{runtime.autocast_dtype}), {trainable:,} trainable params, MLflow run "
                f"{run_id}"
            )
        trust = params.model.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
        policy = distributed.wrap(scorer, world, runtime, params.train.parallel)
        pad = pad_token_id(tokenizer)
        yield DPORecipe(
            Inputs(policy, ref, dataset, pad),
            params.train,
            params.loss,
            runtime,
            checkpoint.Slot(folder, key, run_id),
            Hooks(on_log, share.rebalance),
        )
        distributed.shutdown(world)


def save_outputs(recipe: DPORecipe, params: Params) -> None:
    """models/policy (in the base model's dtype, adapters merged, with the resolved params and
    the MLflow run id), plots/train.csv, reports/ and metrics/train.json and the MLflow summary;
    then the checkpoints go, nothing being left to resume. Every rank calls it: gathering FSDP
    shards is a collective."""
    import mlflow

    from pipeline.track import runs

    state = export.policy_state(recipe.policy)
    if recipe.world.is_main:
        trust = params.model.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
        scorer = getattr(recipe.policy, "module", recipe.policy)  # DDP wraps, FSDP shards in place
        with atomic_dir(MODEL_POLICY) as tmp:
            dtype = export.base_dtype(MODEL_BASE, trust)
            export.save_policy(tmp, scorer, tokenizer, state, dtype, MODEL_BASE, trust)
            save_resolved(params, tmp, "train")
            runs.write_run_file(tmp, recipe.slot.run_id)
        figures = recipe.summary()
        write_csv_atomic(PLOTS / "train.csv", recipe.log, LOG_KEYS)
        write_json_atomic(REPORTS / "train.json", figures)
        write_json_atomic(METRICS / "train.json", {k: figures[k] for k in HEADLINE})
        runs.log_flat_metrics(figures, "train_summary/")
        mlflow.set_tag("diverged", str(figures["diverged"]).lower())  # the champion gate reads it
        if figures["diverged"]:
            print(
                f"train: the train loss reached {figures['max_loss']:.4g} (above 10 x ln 2): "
                "the run diverged; register will keep it from the champion alias"
            )
        mlflow.end_run()
    distributed.barrier(recipe.world)
    if recipe.world.is_main:
        shutil.rmtree(recipe.slot.folder, ignore_errors=True)
