"""Load-time probes of a model: does the scorer reproduce its own log-probs, and which attention
masks may it skip? Each runs a short fixed batch once, without gradients or random numbers."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig, PreTrainedModel

from pipeline.model.loading import is_quantized
from pipeline.stage_io import StageError

if TYPE_CHECKING:  # the scorer runs these probes at load: no import of it at run time
    from pipeline.model.scoring import CompletionScorer


def causal_kernel_masks(model: PreTrainedModel) -> dict[str, None] | None:
    """The prepared attention masks for a batch that needs only causality, where the decoder
    takes them: None for each layer type, so SDPA and flash attention run their causal kernels
    without transformers reading the batch back to decide. Some decoders accept such a mapping
    in place of a 2D mask, others (most families) do not, so it is probed once, on a short
    batch, against the plain path (no mask: transformers builds the causal mask itself). None
    (the plain path) for attention implementations that need the mask itself, for
    sliding-window layers, and for a decoder that refuses the mapping or reads it otherwise."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if config._attn_implementation not in ("sdpa", "flash_attention_2"):
        return None
    if layer_types != {"full_attention"} or not can_probe(model):
        return None
    masks = {"full_attention": None}
    ids = probe_ids(model)
    with probing(model):
        plain = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        try:
            fast = model.get_decoder()(input_ids=ids, attention_mask=masks, use_cache=False)
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
    return masks if close(fast.last_hidden_state, plain) else None


class UnsupportedModel(StageError):
    """A model whose log-probs the scorer cannot reproduce."""


def check_scorer(scorer: CompletionScorer) -> None:
    """Raise UnsupportedModel unless the scorer's log-probs are the model's own: the completion
    tokens of a short probe batch scored by `scorer` against log-softmax of the logits the
    model's forward returns. Made once at load; it catches a family whose forward treats its
    hidden states or logits in a way `LogitRule` does not know."""
    model = scorer.model
    if not can_probe(model):
        return
    ids = probe_ids(model)
    mask = torch.ones_like(ids)
    completion = mask.clone()
    completion[:, : ids.shape[1] // 2] = 0  # the first half is the prompt
    with probing(model):
        logits = model(input_ids=ids, use_cache=False).logits.float()
        got = scorer(ids, mask, completion)
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    expected = (logps * completion[:, 1:]).sum(dim=1)
    if not close(got, expected):
        error = (got - expected).abs().max().item()
        raise UnsupportedModel(
            f"{type(model).__name__} (model_type {model.config.model_type}) is not supported: "
            f"the scorer's log-probs differ from the model's own logits by {error:.3g}; its "
            "forward transforms hidden states or logits in a way the pipeline does not apply"
        )


def miniature(config: PretrainedConfig) -> PretrainedConfig:
    """`config` with as few layers as cover each of its layer types (sliding and full attention
    both, where it mixes them), a 512-token vocabulary, a narrow MLP, and no quantization: the
    same code paths at a few million weights."""
    small = copy.deepcopy(config)
    types = list(getattr(config, "layer_types", None) or [])
    layers = next((i + 1 for i in range(len(types)) if set(types[: i + 1]) == set(types)), 2)
    small.num_hidden_layers = min(layers, config.num_hidden_layers)
    if types:
        small.layer_types = types[: small.num_hidden_layers]
    small.vocab_size = min(config.vocab_size, 512)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(small, key, None)
        if isinstance(value, int) and value >= small.vocab_size:
            setattr(small, key, None)
    if isinstance(getattr(small, "intermediate_size", None), int):
        small.intermediate_size = min(small.intermediate_size, 256)
    if hasattr(small, "quantization_config"):
        del small.quantization_config
    return small


def probe_ids(model: PreTrainedModel) -> torch.Tensor:
    """A fixed (2, 8) batch of token ids within the model's vocabulary, on its device."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    return (torch.arange(16, device=device) * 7919 + 11).remainder(vocab).reshape(2, 8)


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float rounding at the tensors' scale (fp32 on the CPU, bf16 compute on a
    GPU); a wrong mask or logit rule misses by orders of magnitude more."""
    scale = expected.abs().max().item() + 1.0
    return bool((got.float() - expected.float()).abs().max().item() <= 1e-3 * scale)


@contextlib.contextmanager
def probing(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout: a probe draws no random numbers) without gradients,
    then as it was."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def can_probe(model: PreTrainedModel) -> bool:
    """False for a 4-bit model on the CPU: bitsandbytes' CPU backend repacks its weights for
    inference at the first eval forward without gradients, after which they cannot train. (The
    stages run 4-bit models on CUDA only; the tests run them on the CPU.)"""
    device = next(model.parameters()).device
    return not (is_quantized(model) and device.type == "cpu")
