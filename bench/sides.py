"""The two sides of the bench, each one training run on the same workspace and pairs, timed and
measured the same way: this project's train stage path (run_ours) and TRL's DPOTrainer (run_trl).
Imported by bench/dpo_vs_trl.py, which runs each in a fresh process."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import (
    TRL_COLUMNS,
    now,
    summary,
)
from workload import MAX_LENGTH, tokenized_rows

REPO = Path(__file__).resolve().parents[1]


def run_ours(args: argparse.Namespace, **train: Any) -> dict:
    """The train stage's path on the bench workspace, with params.yaml's train section and the
    row's `train` overrides (`lora` and `quantize` set train.lora: QLoRA with quantize="nf4", on
    CUDA with bitsandbytes only). A cached reference is computed first, as the reference stage
    does, and timed as setup."""
    import dataclasses

    from pipeline.data.schema import load_tokenized
    from pipeline.model.loading import resolve_runtime
    from pipeline.model.precompute import score_split
    from pipeline.params import load_params
    from pipeline.train import setup
    from pipeline.train.checkpoint import Slot
    from pipeline.train.recipe import DPORecipe, Hooks, Inputs

    os.chdir(args.workdir)  # the stages' relative paths: models/base, data/tokenized/train
    params = load_params(REPO / "params.yaml")
    lora = dataclasses.replace(
        params.train.lora, enabled=train.pop("lora", False), quantize=train.pop("quantize", "none")
    )
    # TRL's side: the same lr, no warmup, the pairs in epoch_order(seed 0), one row per step.
    overrides = dict(
        lr=1e-4,
        batch_size=args.batch,
        max_steps=args.steps,
        seed=0,
        warmup_ratio=0.0,
        length_grouping=False,
        device=args.device,
        log_every=1,
        lora=lora,
    )
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, **overrides, **train)
    )
    runtime = resolve_runtime(params.train.device)
    t0 = time.perf_counter()
    if params.train.cached_reference:  # what the reference stage stores once per model and data
        score_split(params, "train", runtime, 0, Path("data/reference"))
    setup_seconds = time.perf_counter() - t0
    data = load_tokenized(setup.TRAIN_SPLIT)
    policy = setup.load_policy(params, runtime)
    reference = setup.load_reference(params, runtime, len(data), policy)
    stamps, folder = [now()], Path(tempfile.mkdtemp())
    recipe = DPORecipe(
        Inputs(policy, reference, data, 0),
        params.train,
        params.loss,
        runtime,
        Slot(folder, "bench"),
        Hooks(on_step=lambda: stamps.append(now())),
    )
    recipe.train()
    losses = [row["loss"] for row in recipe.log]
    n_params = sum(p.numel() for p in policy.parameters())
    return summary(losses, stamps, data, n_params, args, setup_seconds)


def run_trl(args: argparse.Namespace, fast: bool = False) -> dict:
    """TRL's DPOTrainer: its defaults, or (`fast`) its fastest setting: reference log-probs
    precomputed before training and no gradient checkpointing."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pipeline.train.plan import epoch_order

    workdir, steps, batch = args.workdir, args.steps, args.batch
    pairs = datasets.Dataset.from_list(json.loads((workdir / "pairs.json").read_text()))
    order = epoch_order(len(pairs), 0, 0)  # the pipeline's epoch-0 order (seed 0), read in turn
    pairs = pairs.select(order.tolist())
    tokenizer = AutoTokenizer.from_pretrained(workdir / "models/base")
    model = AutoModelForCausalLM.from_pretrained(workdir / "models/base", dtype=torch.float32)
    losses: list[float] = []
    stamps: list[float] = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(now())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    cuda = args.device == "cuda"
    speed = {"precompute_ref_log_probs": True, "gradient_checkpointing": False} if fast else {}
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        max_length=MAX_LENGTH,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        seed=0,
        dataloader_drop_last=False,
        disable_tqdm=True,
        bf16=cuda,  # autocast over fp32 master weights, as the pipeline runs on CUDA
        train_sampling_strategy="sequential",
        **speed,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=pairs,
        processing_class=tokenizer,
        callbacks=[Record()],
    )
    _check_same_ids(trainer.train_dataset, workdir, order)
    trainer.train()
    n_params = sum(p.numel() for p in model.parameters())
    return summary(losses, stamps, trainer.train_dataset, n_params, args, 0.0, TRL_COLUMNS)


def _check_same_ids(trl_dataset, workdir: Path, order) -> None:
    ours = [tokenized_rows(workdir)[i] for i in order]
    for row, mine in zip(trl_dataset, ours, strict=True):
        same = (
            row["prompt_ids"] == mine["prompt_input_ids"]
            and row["chosen_ids"] == mine["chosen_input_ids"]
            and row["rejected_ids"] == mine["rejected_input_ids"]
        )
        if not same:
            raise SystemExit("TRL and the pipeline tokenized a pair differently: not the same work")
