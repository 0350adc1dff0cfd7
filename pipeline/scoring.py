"""Completion log-probs without the full (tokens x vocab) logits tensor.

Qwen3's vocabulary has 151,936 entries: fp32 logits for 8 pairs x 2 answers x 512 tokens are
~5 GB, most of them for prompt and padding positions DPO never reads. The scorer runs the decoder,
keeps the hidden states of completion positions only, and applies the LM head plus log-softmax in
chunks; with gradients on, each chunk is recomputed in backward (activation checkpointing), so at
most one chunk of logits is alive at a time. Same numbers as `dpo.sequence_logps` on full logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

# Completion tokens per LM-head chunk: 1024 x 151,936 fp32 logits = 0.6 GB per tensor in flight
# (forward logits, their recomputation and gradient in backward: ~3 of them at the peak).
DEFAULT_CHUNK_TOKENS = 1024


def chunk_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[targets] for one chunk: (K, H), (V, H), (K,) -> (K,) fp32."""
    logits = hidden @ weight.T  # bf16 under autocast, like the model's own lm_head
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """`chunk_token_logps` over (K, H) hidden states in chunks of `chunk_tokens` rows -> (K,)."""
    parts = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start : start + chunk_tokens], weight, targets[start : start + chunk_tokens])
        if torch.is_grad_enabled():
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
    """

    def __init__(self, model: PreTrainedModel, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        super().__init__()
        if getattr(model.config, "final_logit_softcapping", None):
            raise ValueError("logit soft-capping models need the plain logits path")
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, attention_mask, completion_mask: (N, T) -> (N,) fp32 summed log-probs."""
        hidden = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (N, T, H)
        scored = completion_mask[:, 1:].bool()  # the logit at t predicts token t+1
        rows = scored.nonzero(as_tuple=True)[0]
        weight = self.model.get_output_embeddings().weight
        logps = token_logps(
            hidden[:, :-1][scored], weight, input_ids[:, 1:][scored], self.chunk_tokens
        )
        totals = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        return totals.index_add(0, rows, logps)
