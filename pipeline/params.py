"""Typed, frozen view of params.yaml, parsed once and strictly. What each key means is said once,
beside it in params.yaml (tests/test_params.py checks that every key has its comment there).

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
from typing import Literal

from pipeline.stage_io import RESOLVED_PARAMS, write_json_atomic
from pipeline.strict_yaml import (
    ParamsError,
    check,
    non_negative,
    parse_section,
    positive,
    read_yaml,
    resolve_keys,
    stage_param_keys,
)


@dataclasses.dataclass(frozen=True)
class ModelParams:
    name: str
    revision: str
    trust_remote_code: bool
    allow_pickle_weights: bool


@dataclasses.dataclass(frozen=True)
class ColumnsParams:
    prompt: str
    chosen: str
    rejected: str
    system: str
    id: str


@dataclasses.dataclass(frozen=True)
class DataParams:
    dataset: str
    revision: str
    train_dir: str
    eval_dir: str
    columns: ColumnsParams
    fraction: float = dataclasses.field(metadata=check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    eval_size: int = dataclasses.field(metadata=positive())
    seed: int = dataclasses.field(metadata=non_negative())


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    template: str = dataclasses.field(
        metadata=check(lambda v: "{question}" in v, "must contain {question}")
    )
    use_chat_template: bool
    max_length: int = dataclasses.field(metadata=check(lambda v: v >= 16, "must be >= 16"))
    max_prompt_length: int = dataclasses.field(metadata=positive())
    max_drop_share: float = dataclasses.field(
        metadata=check(lambda v: 0 <= v <= 1, "must be in [0, 1]")
    )
    num_proc: int = dataclasses.field(metadata=positive())
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
    enabled: bool = False
    rank: int = dataclasses.field(default=16, metadata=positive())
    alpha: float = dataclasses.field(default=32.0, metadata=positive())
    dropout: float = dataclasses.field(
        default=0.0, metadata=check(lambda v: 0 <= v < 1, "must be in [0, 1)")
    )
    target_modules: str = dataclasses.field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata=check(lambda v: bool(v.strip(",")), "must name at least one module"),
    )


@dataclasses.dataclass(frozen=True)
class LoraParams(AdapterParams):
    """train.lora: the adapter settings, and the policy's 4-bit base (QLoRA)."""

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
    lr: float = dataclasses.field(metadata=positive())
    epochs: int = dataclasses.field(metadata=positive())
    batch_size: int = dataclasses.field(metadata=positive())
    grad_accum: int = dataclasses.field(metadata=positive())
    warmup_ratio: float = dataclasses.field(
        metadata=check(lambda v: 0 <= v < 1, "must be in [0, 1)")
    )
    weight_decay: float = dataclasses.field(metadata=non_negative())
    max_grad_norm: float = dataclasses.field(metadata=positive())
    max_steps: int = dataclasses.field(metadata=non_negative())
    seed: int = dataclasses.field(metadata=non_negative())
    cached_reference: bool
    length_grouping: bool
    device: Device
    nproc: int = dataclasses.field(metadata=positive())
    parallel: Literal["ddp", "fsdp"]
    log_every: int = dataclasses.field(metadata=positive())
    save_every: int = dataclasses.field(metadata=positive())
    max_tokens_per_micro_batch: int = dataclasses.field(metadata=non_negative())
    gradient_checkpointing: bool
    pad_to_multiple_of: int = dataclasses.field(metadata=non_negative())
    compile: Literal["none", "layers"]

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

    variant: LossName = "sigmoid"
    beta: float = dataclasses.field(default=0.1, metadata=positive())
    label_smoothing: float = dataclasses.field(
        default=0.0, metadata=check(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    )
    gamma: float = dataclasses.field(default=0.0, metadata=non_negative())
    sft_weight: float = dataclasses.field(default=0.0, metadata=non_negative())
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
    name: str = dataclasses.field(
        metadata=check(
            lambda v: re.fullmatch(r"[A-Za-z0-9_-]+", v) is not None,
            "must be letters, digits, _ or -",
        )
    )
    dataset: str
    split: str
    size: int = dataclasses.field(metadata=positive())
    revision: str = "main"
    columns: ColumnsParams = dataclasses.field(
        default_factory=lambda: ColumnsParams("", "", "", "", "")
    )
    judge: int = dataclasses.field(default=0, metadata=non_negative())


@dataclasses.dataclass(frozen=True)
class EvalParams:
    batch_size: int = dataclasses.field(metadata=positive())
    device: Device
    datasets: tuple[EvalSetParams, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.datasets]
        if len(set(names)) < len(names):
            raise ParamsError(f"eval.datasets: names must differ, got {names}")


@dataclasses.dataclass(frozen=True)
class ReferenceParams:
    batch_size: int = dataclasses.field(metadata=positive())


@dataclasses.dataclass(frozen=True)
class JudgeParams:
    """The reward model and the generation judge (docs/judge.md)."""

    model: str
    revision: str
    reward_dir: str
    fraction: float = dataclasses.field(metadata=check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    lr: float = dataclasses.field(metadata=positive())
    epochs: int = dataclasses.field(metadata=positive())
    batch_size: int = dataclasses.field(metadata=positive())
    warmup_ratio: float = dataclasses.field(
        metadata=check(lambda v: 0 <= v < 1, "must be in [0, 1)")
    )
    max_grad_norm: float = dataclasses.field(metadata=positive())
    max_length: int = dataclasses.field(metadata=check(lambda v: v >= 16, "must be >= 16"))
    prompts: int = dataclasses.field(metadata=positive())
    samples: int = dataclasses.field(metadata=positive())
    max_new_tokens: int = dataclasses.field(metadata=positive())
    temperature: float = dataclasses.field(metadata=non_negative())
    top_p: float = dataclasses.field(metadata=check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    generate_batch_size: int = dataclasses.field(metadata=positive())
    seed: int = dataclasses.field(metadata=non_negative())
    device: Device
    lora: AdapterParams = dataclasses.field(default_factory=AdapterParams)

    def __post_init__(self) -> None:
        if self.temperature == 0 and self.samples > 1:
            raise ParamsError(
                f"judge.samples: {self.samples} with judge.temperature: 0 would repeat one greedy "
                "answer; set judge.samples: 1, or a temperature above 0 to sample several"
            )


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    experiment: str = dataclasses.field(metadata=check(bool, "must not be empty"))
    model_name: str = dataclasses.field(metadata=check(bool, "must not be empty"))
    champion_alias: str = dataclasses.field(metadata=check(bool, "must not be empty"))
    challenger_alias: str = dataclasses.field(metadata=check(bool, "must not be empty"))
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


def save_resolved(params: Params, folder: str | Path, stage: str) -> None:
    """Write, beside an artifact, the params its stage read (the keys dvc.yaml lists)."""
    resolved = resolve_keys(params, stage_param_keys(stage))
    write_json_atomic(Path(folder) / RESOLVED_PARAMS, resolved)
