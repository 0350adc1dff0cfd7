"""Models and devices: pick the device and precision, load a causal LM, freeze the reference.

CUDA runs the forward under bf16 autocast with fp32 master weights; the CPU runs plain fp32.
The reference is the same weights, frozen and in eval mode, run under the same autocast so that
at step 1 policy and reference produce bit-identical log-probs (loss exactly ln 2).
With `train.lora.quantize: nf4` (QLoRA) the frozen base is loaded in 4-bit through bitsandbytes
instead; the policy and the reference then both run on that same 4-bit base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION, is_bitsandbytes_available

from pipeline.params import Device
from pipeline.stage_io import StageError

Quantize = Literal["none", "nf4"]  # train.lora.quantize

CUDA_ATTENTION_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The numeric setting every forward runs under: the trainer, the reference stage and
        evaluation alike, so that the same weights give the same log-probs everywhere."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype))
        if self.device.type == "cuda":
            # PyTorch prefers cuDNN's attention on recent GPUs, which builds a graph for every new
            # padded length (~2 ms of CPU per call on an H100); the memory-efficient
            # kernel takes masks and any length (flash where no mask is needed, math last).
            stack.enter_context(sdpa_kernel(CUDA_ATTENTION_BACKENDS))
        return stack


def resolve_runtime(device: Device) -> Runtime:
    """`auto`: CUDA (bf16 autocast where supported) when present, else CPU fp32."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device/eval.device is cuda but no CUDA device is available")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return Runtime(torch.device("cpu"), None)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that autocast leaves: use TF32
    torch.backends.cudnn.allow_tf32 = True
    bf16 = torch.cuda.is_bf16_supported()
    return Runtime(torch.device("cuda"), torch.bfloat16 if bf16 else torch.float16)


def attention_implementation(runtime: Runtime) -> str:
    """flash_attention_2 on CUDA when the package is installed, else PyTorch SDPA."""
    if runtime.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(
    path: Path, runtime: Runtime, trust_remote_code: bool, quantize: Quantize = "none"
) -> PreTrainedModel:
    """Load fp32 weights (safetensors only) on the runtime's device; with `quantize="nf4"` every
    linear layer but the LM head in 4-bit (the rest stays fp32). Stages call
    `check_quantize` first: this function itself also runs where bitsandbytes' CPU backend
    does, which the tests use."""
    quantized = quantize != "none"
    load = functools.partial(
        AutoModelForCausalLM.from_pretrained,
        path,
        dtype=torch.float32,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        quantization_config=nf4_config() if quantized else None,
        # bitsandbytes quantises while loading onto the device; a 4-bit model cannot be moved.
        device_map=runtime.device if quantized else None,
    )
    try:
        model = load(attn_implementation=attention_implementation(runtime))
    except ValueError as error:  # a family without that kernel (Gemma-2 has no SDPA path)
        if "attention" not in str(error):
            raise
        model = load()  # transformers' own choice for it
    without_dropout(model)
    return model if quantized else model.to(runtime.device)


def without_dropout(model: torch.nn.Module) -> None:
    """Switch off the model's own dropout (nn.Dropout modules and the attention dropout rate
    modules keep as a number), as DPO trainers do: with it the policy's log-probs are noisy
    draws, so step 1 would not cost ln 2 and every implicit reward would carry the noise. Qwen3
    has none; GPT-2 and Phi do. The config is left as it was, so the saved policy's is the
    base's. LoRA's own dropout (train.lora.dropout) is added later and stays."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def nf4_config() -> BitsAndBytesConfig:
    """QLoRA's recipe: 4-bit NormalFloat weights, bf16 compute, quantised quantisation scales."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def check_quantize(quantize: Quantize, runtime: Runtime, device_key: str) -> None:
    """Refuse, in one line with the way out, a 4-bit base where the stages do not support it:
    off CUDA (bitsandbytes' CPU backend is built for inference: an eval-mode forward without
    gradients repacks the 4-bit weights into a layout whose matmul has no backward) or without
    bitsandbytes. `device_key` names the setting that chose the device."""
    if quantize == "none":
        return
    if runtime.device.type != "cuda":
        raise StageError(
            f"train.lora.quantize: {quantize} needs a CUDA GPU, but {device_key} runs on "
            f"{runtime.device.type}: set train.lora.quantize: none (LoRA on the full-precision "
            f"base) or run on a GPU with {device_key}: auto or cuda"
        )
    if not is_bitsandbytes_available():
        raise StageError(
            f"train.lora.quantize: {quantize} needs the bitsandbytes package "
            f"(>= {BITSANDBYTES_MIN_VERSION}): pip install bitsandbytes "
            "(or pip install -e '.[qlora]')"
        )


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a model (or a peft wrapper of one) loaded in 4-bit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False))


def use_packing(model: PreTrainedModel) -> bool:
    """Padding-free (packed) batches where a variable-length attention kernel makes them pay:
    a model loaded with flash-attention 2 (CUDA, the package installed, a family that has it).
    Elsewhere a packed row would need a dense block-diagonal mask, quadratic in the whole
    batch's tokens, so the length-grouped padded path is faster."""
    return model.config._attn_implementation == "flash_attention_2"


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Reference model: eval mode (no dropout), no gradients, never in an optimizer."""
    model.eval()
    model.requires_grad_(False)
    return model


def assert_frozen(model: torch.nn.Module) -> None:
    if model.training or any(p.requires_grad for p in model.parameters()):
        raise AssertionError("the reference model must stay in eval mode with no gradients")


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id right-padding uses (masked out everywhere): pad if the tokenizer has one, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile every decoder layer in place (same module, same state_dict keys: a
    checkpoint resumes either way); returns how many. Each layer compiles once per shape it
    sees (dynamic=False: no slower shape-generic kernels), so the padded lengths should be few
    (train.pad_to_multiple_of); the recompile limit is raised to cover them."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"train.compile: no decoder layers found in {type(model).__name__}")
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, COMPILED_SHAPES)
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers keeps whole when it splits a
    model over devices (`_no_split_modules`: LlamaDecoderLayer, GPT2Block, GPTNeoXLayer...)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


# Shapes a compiled layer may compile for before torch falls back to eager: padded lengths
# times the few batch sizes a run has (the last batch, token-budget splits).
COMPILED_SHAPES = 64


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    Non-reentrant checkpointing: it works under DDP and FSDP and with inputs that need no grad.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:  # transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
