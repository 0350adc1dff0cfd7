"""Typed, frozen view of params.yaml, parsed once and strictly.

Every section of params.yaml maps to one frozen dataclass below. Parsing rejects, before any work
starts and naming the offending key: unknown keys, missing keys, wrong types and out-of-range
values. Numbers are accepted in any YAML spelling: `dvc exp run -S train.lr=1e-6` writes `1e-06`
back to params.yaml, which PyYAML's safe_load returns as the *string* "1e-06".
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pipeline.stage_io import RESOLVED_PARAMS, write_json_atomic
from pipeline.strict_yaml import (
    ParamsError,
    check,
    non_negative,
    parse_section,
    positive,
    read_yaml,
)


@dataclasses.dataclass(frozen=True)
class ModelParams:
    # Hub id ("Qwen/Qwen3-0.6B") or a local HF directory (the offline demo points it at one).
    name: str
    # Hub revision (branch, tag or commit sha); ignored for local directories.
    revision: str
    # Run model code shipped with the checkpoint. Off: Qwen3 is built into transformers.
    trust_remote_code: bool
    # Accept pickle (.bin/.pt) weights when no safetensors exist. Off: pickle can run code.
    allow_pickle_weights: bool


@dataclasses.dataclass(frozen=True)
class ColumnsParams:
    # Column holding the prompt: text (one user turn) or a list of {role, content} messages.
    # "" everywhere: the format is told from the columns (README: "Your own data").
    prompt: str
    # Column holding the preferred answer: text, or messages ending with an assistant turn.
    chosen: str
    # Column holding the other answer, in the same form as `chosen`.
    rejected: str
    # Column holding a system prompt (optional).
    system: str
    # Column holding the prompt's identity, which keeps a prompt's pairs on one side of the
    # held-out split ("": the prompt text itself).
    id: str


@dataclasses.dataclass(frozen=True)
class DataParams:
    # Hub dataset id, or a local folder in the hub layout (the offline demo points it at its
    # generated one).
    dataset: str
    # Hub revision of the dataset repository.
    revision: str
    # The train pairs: a folder of the repository (data/rl) or a split name (train, train_prefs)
    # found as data/<split>-*.parquet, <split>.jsonl, <split>.json, <split>.csv or <split>.parquet.
    train_dir: str
    # The held-out pairs, named like train_dir; "": carved out of train_dir's pairs.
    eval_dir: str
    # Column names for a format that is not told from its columns (all "": detect).
    columns: ColumnsParams
    # Share of the train folder's pairs to use, in (0, 1].
    fraction: float = dataclasses.field(metadata=check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # Number of held-out pairs (whole questions are kept together, so it is a lower bound).
    eval_size: int = dataclasses.field(metadata=positive())
    # Seed of the subsample.
    seed: int = dataclasses.field(metadata=non_negative())


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    # Prompt template; {question} is replaced by the question text.
    template: str = dataclasses.field(
        metadata=check(lambda v: "{question}" in v, "must contain {question}")
    )
    # Use the tokenizer's chat template (user turn + generation prompt) instead of `template`.
    use_chat_template: bool
    # Longest prompt + completion, in tokens.
    max_length: int = dataclasses.field(metadata=check(lambda v: v >= 16, "must be >= 16"))
    # Longest prompt, in tokens (the start is kept); must leave room for the answer.
    max_prompt_length: int = dataclasses.field(metadata=positive())
    # Fail the stage when more than this share of a split's pairs is dropped.
    max_drop_share: float = dataclasses.field(
        metadata=check(lambda v: 0 <= v <= 1, "must be in [0, 1]")
    )
    # Worker processes for tokenization.
    num_proc: int = dataclasses.field(metadata=positive())
    # Pairs per Arrow shard written to disk (at least one shard per split).
    pairs_per_shard: int = dataclasses.field(metadata=positive())

    def __post_init__(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ParamsError(
                "tokenize.max_prompt_length must be < tokenize.max_length "
                f"({self.max_prompt_length} >= {self.max_length}): no room is left for the answer"
            )


Device = Literal["auto", "cpu", "cuda"]


@dataclasses.dataclass(frozen=True)
class AdapterParams:
    # Train low-rank adapters (peft LoRA) instead of every weight. For the policy the base stays
    # frozen, so the reference is the same model with its adapters switched off (no second copy
    # in memory); the reward model's adapters are merged into it when it is saved.
    enabled: bool = False
    # Rank r of each adapter's two factors.
    rank: int = dataclasses.field(default=16, metadata=positive())
    # Scale: the adapter's update is multiplied by alpha / rank.
    alpha: float = dataclasses.field(default=32.0, metadata=positive())
    # Dropout on the adapters' input during training.
    dropout: float = dataclasses.field(
        default=0.0, metadata=check(lambda v: 0 <= v < 1, "must be in [0, 1)")
    )
    # Comma-separated module names that get adapters: every linear layer of attention and MLP
    # (Qwen3's and Llama's names); all-linear: every linear layer but the output head, any family.
    target_modules: str = dataclasses.field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata=check(lambda v: bool(v.strip(",")), "must name at least one module"),
    )


@dataclasses.dataclass(frozen=True)
class LoraParams(AdapterParams):
    """train.lora: the adapter settings, and the policy's 4-bit base (QLoRA)."""

    # "nf4": load the frozen base in 4-bit NormalFloat (QLoRA: bitsandbytes, bf16 compute, double
    # quantisation), for bases whose bf16 weights do not fit the GPU next to the adapters' state.
    # Needs adapters (a 4-bit weight cannot be trained) and CUDA (the stage refuses the CPU);
    # the reference is then that same 4-bit base, in the reference stage's cache as on the fly.
    quantize: Literal["none", "nf4"] = "none"

    def __post_init__(self) -> None:
        if self.quantize != "none" and not self.enabled:
            raise ParamsError(
                f"train.lora.quantize: {self.quantize} needs train.lora.enabled: true (only "
                "adapters train on a 4-bit base); set train.lora.quantize: none for a full "
                "fine-tune"
            )


@dataclasses.dataclass(frozen=True)
class TrainParams:
    # Peak learning rate of AdamW (reached after warmup, then linear decay to 0).
    lr: float = dataclasses.field(metadata=positive())
    # Passes over the train pairs.
    epochs: int = dataclasses.field(metadata=positive())
    # Pairs per optimizer micro-step (each pair is two sequences: chosen and rejected).
    batch_size: int = dataclasses.field(metadata=positive())
    # Micro-steps accumulated per optimizer step.
    grad_accum: int = dataclasses.field(metadata=positive())
    # Share of optimizer steps spent in linear warmup.
    warmup_ratio: float = dataclasses.field(
        metadata=check(lambda v: 0 <= v < 1, "must be in [0, 1)")
    )
    # AdamW decoupled weight decay.
    weight_decay: float = dataclasses.field(metadata=non_negative())
    # Gradient clipping threshold on the global L2 norm.
    max_grad_norm: float = dataclasses.field(metadata=positive())
    # Stop after this many optimizer steps; 0 means the epochs decide.
    max_steps: int = dataclasses.field(metadata=non_negative())
    # Seed of weight-independent randomness (shuffling, dropout).
    seed: int = dataclasses.field(metadata=non_negative())
    # Read reference log-probs from the reference stage (no reference model in memory, no second
    # forward); false computes them on the fly with a frozen copy of the base model.
    cached_reference: bool
    # Batch pairs of similar length (seeded, batch order still random): less padding.
    length_grouping: bool
    # "auto": CUDA with bf16 autocast when present, else CPU fp32.
    device: Device
    # Processes started by torchrun (one per GPU); batch_size is per process.
    nproc: int = dataclasses.field(metadata=positive())
    # With nproc > 1: "ddp" (a full replica per GPU) or "fsdp" (weights, gradients and AdamW state
    # sharded across GPUs, for models that do not fit one).
    parallel: Literal["ddp", "fsdp"]
    # Optimizer steps between metric lines (tqdm postfix, plots/train.csv).
    log_every: int = dataclasses.field(metadata=positive())
    # Optimizer steps between resumable checkpoints.
    save_every: int = dataclasses.field(metadata=positive())
    # Padded tokens (2 x pairs x longest row) one forward may hold on each process. A micro-batch
    # above it runs as several forwards whose gradients add up to the same step, so a batch of
    # long answers does not run out of memory and short ones still share one forward. 0 = no
    # limit.
    max_tokens_per_micro_batch: int = dataclasses.field(metadata=non_negative())
    # Recompute each decoder layer's activations during backward instead of keeping them: far
    # less activation memory for about a third more compute; gradients unchanged.
    gradient_checkpointing: bool
    # Round each forward's padded length up to a multiple of this, so a run sees a few distinct
    # shapes, not one per batch: what train.compile needs to compile each shape once (and GPU
    # kernels that pick a plan per shape). 0 pads to the longest row only.
    pad_to_multiple_of: int = dataclasses.field(metadata=non_negative())
    # "layers": torch.compile every decoder layer (fused elementwise work, fewer kernel launches;
    # the first steps of each new shape pay the compilation). "none": eager, the default until a
    # GPU measurement shows the gain (docs/figures.md); use it with pad_to_multiple_of (e.g. 64).
    compile: Literal["none", "layers"]

    # Low-rank adapters (docs/lora.md); off trains every weight.
    lora: LoraParams = dataclasses.field(default_factory=LoraParams)

    def __post_init__(self) -> None:
        if self.compile != "none" and self.nproc > 1 and self.parallel == "fsdp":
            # FSDP's per-layer hooks around a compiled layer are not built or tested here.
            raise ParamsError(
                f"train.compile: {self.compile} with train.parallel: fsdp is not supported: use "
                "train.parallel: ddp or train.compile: none"
            )
        if self.lora.quantize != "none" and self.nproc > 1 and self.parallel == "fsdp":
            # FSDP would have to shard bitsandbytes' packed 4-bit weights: not built, not tested.
            raise ParamsError(
                f"train.lora.quantize: {self.lora.quantize} with train.parallel: fsdp is not "
                "supported: use train.parallel: ddp (each GPU holds the 4-bit base)"
            )


#: The loss variants (formulas: pipeline/objective/losses.py and docs/objective.md).
LossName = Literal["sigmoid", "robust", "ipo", "hinge", "simpo"]
#: Variants that read label_smoothing (as the smoothing eps, resp. the label flip rate).
LABEL_SMOOTHED = frozenset({"sigmoid", "robust"})
#: Variants defined without a reference model: their rewards are beta * average policy log-prob.
REFERENCE_FREE = frozenset({"simpo"})


@dataclasses.dataclass(frozen=True)
class LossParams:
    """The objective: train, evaluate and register all read it from here. A setting the chosen
    variant would ignore is an error, not a silent no-op. Defaults (plain DPO) serve code that
    builds LossParams directly; params.yaml must name every key."""

    # sigmoid | robust | ipo | hinge | simpo.
    variant: LossName = "sigmoid"
    # DPO temperature: strength of the pull towards the reference model.
    beta: float = dataclasses.field(default=0.1, metadata=positive())
    # sigmoid: cDPO smoothing eps; robust: assumed label flip rate. In [0, 0.5); 0 = plain DPO.
    label_smoothing: float = dataclasses.field(
        default=0.0, metadata=check(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    )
    # SimPO's target reward margin (simpo only).
    gamma: float = dataclasses.field(default=0.0, metadata=non_negative())
    # Weight of the chosen answer's per-token NLL added to the loss (RPO); 0 = off.
    sft_weight: float = dataclasses.field(default=0.0, metadata=non_negative())
    # No reference model: its log-probs are taken as 0 (required by simpo).
    reference_free: bool = False

    def __post_init__(self) -> None:
        name = self.variant
        if self.label_smoothing and name not in LABEL_SMOOTHED:
            wrong = f"loss.label_smoothing applies to {sorted(LABEL_SMOOTHED)} only, not {name}"
        elif self.gamma and name != "simpo":
            wrong = f"loss.gamma is SimPO's target margin and applies to simpo only, not {name}"
        elif name in REFERENCE_FREE and not self.reference_free:
            wrong = f"loss.variant {name} is reference-free: set loss.reference_free: true"
        else:
            return
        raise ParamsError(wrong)


@dataclasses.dataclass(frozen=True)
class EvalSetParams:
    # The set's name in metrics/eval.json, MLflow and the comparison (letters, digits, _ and -).
    name: str = dataclasses.field(
        metadata=check(
            lambda v: re.fullmatch(r"[A-Za-z0-9_-]+", v) is not None,
            "must be letters, digits, _ or -",
        )
    )
    # Hub dataset id or local folder, in any format data.dataset reads.
    dataset: str
    # The split to hold out pairs from, named as data.eval_dir is.
    split: str
    # Held-out pairs taken (whole prompts kept together, so it is a lower bound).
    size: int = dataclasses.field(metadata=positive())
    # Hub revision of the dataset.
    revision: str = "main"
    # Column names, as data.columns (omitted: told from the columns).
    columns: ColumnsParams = dataclasses.field(
        default_factory=lambda: ColumnsParams("", "", "", "", "")
    )
    # Held-out prompts of the set the judge answers with the base model and the policy (the
    # judge_sets stage, judge.* settings); 0: the set is not judged.
    judge: int = dataclasses.field(default=0, metadata=non_negative())


@dataclasses.dataclass(frozen=True)
class EvalParams:
    # Pairs per forward pass (no gradients, so larger than train.batch_size is fine).
    batch_size: int = dataclasses.field(metadata=positive())
    # Same meaning as train.device.
    device: Device
    # Extra held-out sets, scored beside the main one: how the policy does on other preference
    # data (README: "Your own data").
    datasets: tuple[EvalSetParams, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.datasets]
        if len(set(names)) < len(names):
            raise ParamsError(f"eval.datasets: names must differ, got {names}")


@dataclasses.dataclass(frozen=True)
class ReferenceParams:
    # Pairs per forward pass when precomputing reference log-probs (train.device / eval.device
    # decide where each split is scored, so the cache matches the stage that reads it).
    batch_size: int = dataclasses.field(metadata=positive())


@dataclasses.dataclass(frozen=True)
class JudgeParams:
    """The reward model and the generation judge (docs/judge.md)."""

    # "" trains a Bradley-Terry reward model on `reward_dir` (the `reward` stage); else a hub id
    # or local folder of a sequence-classification reward model with one output, used as it is.
    model: str
    # Hub revision of `model` (ignored for a local folder).
    revision: str
    # Split of data.dataset holding the reward model's pairs, named as data.train_dir is (not the
    # DPO pairs, not held out); "": the train split's pairs the policy does not train on.
    reward_dir: str
    # Share of reward_dir's pairs to train on, in (0, 1] (only the shards it needs are fetched).
    fraction: float = dataclasses.field(metadata=check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # Reward model training: AdamW peak lr (linear warmup then decay), passes, pairs per step.
    lr: float = dataclasses.field(metadata=positive())
    epochs: int = dataclasses.field(metadata=positive())
    batch_size: int = dataclasses.field(metadata=positive())
    # Reward model training, as train.*: share of steps in linear warmup, gradient clipping norm.
    warmup_ratio: float = dataclasses.field(
        metadata=check(lambda v: 0 <= v < 1, "must be in [0, 1)")
    )
    max_grad_norm: float = dataclasses.field(metadata=positive())
    # Longest prompt + answer the reward model reads, in tokens (the answer's end is cut).
    max_length: int = dataclasses.field(metadata=check(lambda v: v >= 16, "must be >= 16"))
    # Held-out questions both models answer (distinct questions, a seeded choice).
    prompts: int = dataclasses.field(metadata=positive())
    # Answers per question and model; sample i of the policy is compared with sample i of the base.
    samples: int = dataclasses.field(metadata=positive())
    # Decoding, the same for both models: answer length cap, sampling temperature (0 = greedy)
    # and nucleus share.
    max_new_tokens: int = dataclasses.field(metadata=positive())
    temperature: float = dataclasses.field(metadata=non_negative())
    top_p: float = dataclasses.field(metadata=check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # Questions per generate() call (each row holds `samples` answers).
    generate_batch_size: int = dataclasses.field(metadata=positive())
    # Seed of the reward model's init and shuffling, the question choice and the sampling.
    seed: int = dataclasses.field(metadata=non_negative())
    # Same meaning as train.device.
    device: Device
    # LoRA adapters on the reward model's backbone (its scalar head trains in full), as
    # train.lora; merged into the saved model, so the judge reads a plain model either way.
    lora: AdapterParams = dataclasses.field(default_factory=AdapterParams)

    def __post_init__(self) -> None:
        if self.temperature == 0 and self.samples > 1:
            raise ParamsError(
                f"judge.samples: {self.samples} with judge.temperature: 0 would repeat one greedy "
                "answer; set judge.samples: 1, or a temperature above 0 to sample several"
            )


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    # MLflow experiment that holds one run per trained policy.
    experiment: str = dataclasses.field(metadata=check(bool, "must not be empty"))
    # Registered model name in the MLflow Model Registry.
    model_name: str = dataclasses.field(metadata=check(bool, "must not be empty"))
    # Alias moved to a new version only when it beats the current holder's win rate.
    champion_alias: str = dataclasses.field(metadata=check(bool, "must not be empty"))
    # Alias given to a new version that does not beat the champion.
    challenger_alias: str = dataclasses.field(metadata=check(bool, "must not be empty"))
    # What decides the champion: the held-out pair win rate (evaluate) or the generation win
    # rate against the base model (judge). A version records both either way.
    gate: Literal["win_rate", "gen_win_rate"] = "win_rate"


@dataclasses.dataclass(frozen=True)
class Params:
    """All of params.yaml. Stages validate the whole file, then use their sections."""

    model: ModelParams
    data: DataParams
    tokenize: TokenizeParams
    reference: ReferenceParams
    train: TrainParams
    loss: LossParams
    eval: EvalParams
    judge: JudgeParams
    register: RegisterParams


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate every section of the params file; unknown sections are errors."""
    raw, sections = read_yaml(path), typing.get_type_hints(Params)  # in params.yaml's order
    if unknown := sorted(set(raw) - set(sections)):
        raise ParamsError(f"unknown section {unknown[0]} in {path} (known: {', '.join(sections)})")
    if missing := [name for name in sections if name not in raw]:
        raise ParamsError(f"missing section {missing[0]} in {path}")
    return Params(**{name: parse_section(name, raw[name], cls) for name, cls in sections.items()})


def stage_param_keys(stage: str, dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """The params keys dvc.yaml lists for `stage` (sections or dotted keys): one source of truth."""
    stages = read_yaml(dvc_file).get("stages", {})
    if stage not in stages:
        raise KeyError(f"no stage {stage!r} in {dvc_file}")
    return [key for key in stages[stage].get("params", []) if isinstance(key, str)]


def resolve_keys(params: Params, keys: list[str]) -> dict[str, Any]:
    """Nested dict of the values behind `keys` ("train", "train.lr" or "train.lora.quantize")."""
    resolved: dict[str, Any] = {}
    for key in keys:
        section, *path = key.split(".")
        node, name, value = resolved, section, dataclasses.asdict(getattr(params, section))
        for part in path:  # down one level per dot, keeping the nesting of params.yaml
            node, name, value = node.setdefault(name, {}), part, value[part]
        node[name] = value
    return resolved


def save_resolved(params: Params, folder: str | Path, stage: str) -> None:
    """Write, beside an artifact, the params its stage read (the keys dvc.yaml lists)."""
    resolved = resolve_keys(params, stage_param_keys(stage))
    write_json_atomic(Path(folder) / RESOLVED_PARAMS, resolved)
