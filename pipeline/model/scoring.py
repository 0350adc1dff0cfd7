"""Completion log-probs of `[chosen; rejected]` batches, without the full (tokens x vocab) logits.

Qwen3's vocabulary has 151,936 entries: fp32 logits for 8 pairs x 2 answers x 512 tokens are
~5 GB, most of them for prompt and padding positions DPO never reads. The scorer runs the decoder,
keeps the hidden states of completion positions only, and applies the LM head plus log-softmax in
chunks; with gradients on, each chunk is recomputed in backward (activation checkpointing), so at
most one chunk of logits is alive at a time. tests/plain_dpo.py scores from the full logits, the
plain way, and the tests check that both give the same numbers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from pipeline.model.batches import PairBatch, collate_pairs, scored_positions
from pipeline.model.loading import (
    Quantize,
    Runtime,
    load_causal_lm,
    use_packing,
)
from pipeline.model.probes import causal_kernel_masks, check_scorer, miniature
from pipeline.stage_io import bar

# Logit elements per LM-head chunk: 256 tokens x 151,936 fp32 = 156 MB per tensor in flight
# (logits, log-softmax temporaries and their gradient in backward: a few at the peak). Measured
# by bench/dpo_vs_trl.py on CPU at Qwen3's vocabulary: 1024-token chunks -> 3.6 GB peak RSS,
# 256 -> 1.85 GB, 4 % slower. Still large enough matmuls to keep a GPU busy.
CHUNK_LOGIT_ELEMENTS = 256 * 151_936


def chunk_tokens_for(vocab_size: int) -> int:
    """Completion tokens per chunk so that one chunk's logits stay within CHUNK_LOGIT_ELEMENTS."""
    return max(1, CHUNK_LOGIT_ELEMENTS // vocab_size)


@dataclasses.dataclass(frozen=True)
class LogitRule:
    """What a model's own forward does to `hidden @ lm_head.weight.T (+ bias)` before its
    softmax, read from its config: the scorer applies the same, so its log-probs are the
    model's. A family doing something else is caught by `check_scorer` at load."""

    scale: float = 1.0  # Cohere's logit_scale; Granite divides by logits_scaling
    softcap: float | None = None  # Gemma-2's final_logit_softcapping: cap * tanh(logits / cap)

    @classmethod
    def of(cls, config: Any) -> LogitRule:
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        scale /= float(getattr(config, "logits_scaling", None) or 1.0)
        return cls(scale, getattr(config, "final_logit_softcapping", None) or None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


PLAIN_LOGITS = LogitRule()


def chunk_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    rule: LogitRule = PLAIN_LOGITS,
) -> torch.Tensor:
    """log softmax(rule(hidden @ weight.T + bias))[targets] for one chunk: (K, H), (V, H),
    (K,), (V,) -> (K,) fp32."""
    logits = hidden @ weight.T  # bf16 under autocast, like the model's own lm_head
    if bias is not None:
        logits = logits + bias
    logits = rule(logits)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int | None = None,
    bias: torch.Tensor | None = None,
    rule: LogitRule = PLAIN_LOGITS,
) -> torch.Tensor:
    """`chunk_token_logps` over (K, H) hidden states in chunks of `chunk_tokens` rows -> (K,).

    With gradients on and more than one chunk, each chunk is recomputed in backward instead of
    keeping its logits alive; a batch that fits one chunk keeps them (within the budget anyway)
    and skips the recomputation.
    """
    chunk_tokens = chunk_tokens or chunk_tokens_for(weight.shape[0])
    recompute = torch.is_grad_enabled() and hidden.shape[0] > chunk_tokens
    parts = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        args = (hidden[chunk], weight, targets[chunk], bias, rule)
        if recompute:
            parts.append(checkpoint(chunk_token_logps, *args, use_reentrant=False))
        else:
            parts.append(chunk_token_logps(*args))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


class CompletionScorer(torch.nn.Module):
    """A causal LM that returns summed completion log-probs, (N,), instead of logits.

    It is an nn.Module so DDP/FSDP can wrap it: their gradient hooks need the forward to run
    through the wrapper, not through pieces of the model called separately.

    `packed=True` runs the N right-padded rows as one padding-free row of their real tokens, with
    position ids restarting at 0 for each row; transformers then keeps attention inside each row
    (flash-attention's variable-length kernel on CUDA, a block-diagonal mask elsewhere). Only
    worth it where that kernel exists: `loading.use_packing` decides. `chunk_tokens=None` sizes
    the LM-head chunks from the vocabulary (`chunk_tokens_for`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        chunk_tokens: int | None = None,
        packed: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.packed = packed
        self.rule = LogitRule.of(model.config)
        self.masks = causal_kernel_masks(model)
        check_scorer(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        scored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask, completion_mask: (N, T), rows right-padded -> (N,) fp32
        summed log-probs. `scored` is `PairBatch.scored` (the predicting positions, found on the
        host); without it they are found here, which on a GPU waits for the device.

        Unpacked, the padding mask is not passed to the model: in a right-padded row a real token
        attends only to earlier tokens, all real, so the causal mask alone gives the same hidden
        states. Padded positions get other values, which nothing reads. Where the decoder takes
        it (`causal_kernel_masks`, probed at load), the model is told that no mask is needed:
        SDPA and flash attention run their causal kernels, and transformers reads nothing back
        from the device to decide.
        """
        if self.packed:
            return self._packed_forward(input_ids, attention_mask, completion_mask)
        if scored is None:
            scored = scored_positions(completion_mask)
        hidden = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=self.masks, use_cache=False
        ).last_hidden_state  # (N, T, H)
        width = input_ids.shape[1]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)  # (K, H)
        targets = input_ids.reshape(-1).index_select(0, scored + 1)  # the token each predicts
        return self._sum_logps(picked, targets, scored // width, len(input_ids))

    def _packed_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
    ) -> torch.Tensor:
        ids, positions, rows, completion = pack_rows(input_ids, attention_mask, completion_mask)
        hidden = self.model.get_decoder()(
            input_ids=ids[None], position_ids=positions[None], use_cache=False
        ).last_hidden_state[0]  # (L, H)
        # Token t+1 is scored from position t only inside one row (a row never predicts the next).
        scored = completion[1:] & (rows[1:] == rows[:-1])
        return self._sum_logps(
            hidden[:-1][scored], ids[1:][scored], rows[1:][scored], len(input_ids)
        )

    def _sum_logps(
        self, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int
    ) -> torch.Tensor:
        """(K, H) hidden states of scored positions, their (K,) targets and rows -> (N,) sums."""
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        logps = token_logps(hidden, head.weight, targets, self.chunk_tokens, bias, self.rule)
        totals = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        return totals.index_add(0, rows, logps)


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (N, T) rows -> their real tokens back to back, all (L,) with L = real tokens.

    Returns (ids, position ids restarting at 0 per row, row of each token, completion flag).
    Row-major boolean indexing keeps each row's tokens contiguous and in order.
    """
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, dim=0) - lengths
    positions = torch.arange(len(rows), device=rows.device) - starts[rows]
    return input_ids[keep], positions, rows, completion_mask[keep].bool()


def check_architecture(config: PretrainedConfig, trust_remote_code: bool) -> None:
    """`CompletionScorer`'s load-time checks before any weight is read, so that a family the
    scorer cannot serve fails in download_model, in one line, whatever the model's size: they
    run on a miniature of the architecture with random weights (`miniature`)."""
    small = miniature(config)
    with torch.random.fork_rng(devices=[]):  # random init: leave the caller's stream alone
        model = AutoModelForCausalLM.from_config(small, trust_remote_code=trust_remote_code)
    CompletionScorer(model.float())


def load_scorer(
    path: Path, runtime: Runtime, trust_remote_code: bool, quantize: Quantize = "none"
) -> CompletionScorer:
    """The causal LM at `path` as a CompletionScorer, packed where `use_packing` says so; with
    `quantize="nf4"` on a 4-bit base (`loading.load_causal_lm`)."""
    model = load_causal_lm(path, runtime, trust_remote_code, quantize)
    return CompletionScorer(model, packed=use_packing(model))


def batch_logps(scorer: torch.nn.Module, batch: PairBatch, runtime: Runtime) -> torch.Tensor:
    """Summed completion log-probs of every row of `batch`, shape (2B,), fp32, `[chosen;
    rejected]`. `scorer` is a CompletionScorer, possibly DDP/FSDP-wrapped (their hooks need the
    call to go through the wrapper)."""
    with runtime.autocast():
        return scorer(
            batch.input_ids, batch.attention_mask, batch.completion_mask, batch.scored
        ).float()


@torch.no_grad()
def score_pairs(
    scorer: CompletionScorer,
    dataset: Any,
    batch_size: int,
    runtime: Runtime,
    pad_token_id: int,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed completion log-probs of every pair, float64 arrays (N,).

    The batches' log-probs stay on the device until the end: one read back for the split, so the
    next batch is queued while the device works on this one."""
    scorer.eval()
    chosen, rejected = [], []
    for start in bar(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
        rows = dataset[start : start + batch_size]
        batch = collate_pairs(rows, pad_token_id).to(runtime.device)
        logps = batch_logps(scorer, batch, runtime)
        chosen.append(logps[: batch.n_pairs])
        rejected.append(logps[batch.n_pairs :])
    if not chosen:
        return np.zeros(0), np.zeros(0)
    both = torch.stack([torch.cat(chosen), torch.cat(rejected)]).double().cpu().numpy()
    return both[0], both[1]
