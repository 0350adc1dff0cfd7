"""Tokenized pairs as padded `[chosen; rejected]` batches: what the scorer, the reference cache
and the training step read, built on the host, so that reading a batch's sizes never waits for a
device."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch


def scored_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) completion mask -> (K,) flat indices into the (N, T) positions whose logit DPO
    reads, row-major: position t of a row predicts its token t + 1, so t is scored when token
    t + 1 is a completion token."""
    predicts = torch.zeros_like(completion_mask, dtype=torch.bool)
    predicts[:, :-1] = completion_mask[:, 1:].bool()
    return predicts.flatten().nonzero().squeeze(1)


@dataclasses.dataclass(frozen=True)
class PairBatch:
    input_ids: torch.Tensor  # (2B, T) prompt + completion, right-padded; chosen rows first
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens
    completion_mask: torch.Tensor  # (2B, T) 1 on completion tokens (the ones DPO scores)
    scored: torch.Tensor  # (K,) `scored_positions(completion_mask)`, found on the host
    n_pairs: int  # B
    real_tokens: int  # tokens that are not padding, counted on the host (reading it never syncs)

    def to(self, device: torch.device) -> PairBatch:
        tensors = (self.input_ids, self.attention_mask, self.completion_mask, self.scored)
        return PairBatch(*(to_device(t, device) for t in tensors), self.n_pairs, self.real_tokens)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. On CUDA through pinned memory, without waiting: a plain copy
    from pageable memory would wait for every queued kernel; this one overlaps them."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def collate_pairs(
    columns: Mapping[str, Sequence[Sequence[int]]], pad_token_id: int, multiple: int = 0
) -> PairBatch:
    """Build a PairBatch from tokenized columns (`dataset[indices]` of the tokenized shards),
    padded to the longest row, rounded up to a multiple of `multiple` when it is above 0.

    Prompt and completion ids were tokenized separately and are concatenated here, so no token
    merges across the boundary; the completion mask starts where the prompt ends.
    """
    prompts = columns["prompt_input_ids"]
    sequences, prompt_lengths = [], []
    for side in ("chosen", "rejected"):
        for prompt, completion in zip(prompts, columns[f"{side}_input_ids"], strict=True):
            sequences.append(list(prompt) + list(completion))
            prompt_lengths.append(len(prompt))
    width = max(len(s) for s in sequences)
    if multiple > 0:
        width = -(-width // multiple) * multiple
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        completion[i, start : len(seq)] = 1
    real = sum(len(seq) for seq in sequences)
    scored = scored_positions(completion)
    return PairBatch(input_ids, attention, completion, scored, len(prompts), real)
