"""Tokenized pairs -> padded `[chosen; rejected]` batches, and the seeded order they come in.

One forward pass sees chosen and rejected sequences of the same pairs as one batch of 2B rows
(chosen first), right-padded, with a mask that is 1 on completion tokens only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class PairBatch:
    input_ids: torch.Tensor  # (2B, T) prompt + completion, right-padded; chosen rows first
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens
    completion_mask: torch.Tensor  # (2B, T) 1 on completion tokens (the ones DPO scores)
    n_pairs: int  # B

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.n_pairs,
        )

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_pairs(columns: Mapping[str, Sequence[Sequence[int]]], pad_token_id: int) -> PairBatch:
    """Build a PairBatch from tokenized columns (`dataset[indices]` of the tokenized shards)."""
    prompts = columns["prompt_input_ids"]
    sequences, prompt_lengths = [], []
    for side in ("chosen", "rejected"):
        for prompt, completion in zip(prompts, columns[f"{side}_input_ids"], strict=True):
            sequences.append(list(prompt) + list(completion))
            prompt_lengths.append(len(prompt))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        completion[i, start : len(seq)] = 1
    return PairBatch(input_ids, attention, completion, n_pairs=len(prompts))


def epoch_order(n_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the pairs for one epoch; a function of (seed, epoch) only, so a resumed
    run replays exactly the order an uninterrupted one would have used."""
    return np.random.default_rng([seed, epoch]).permutation(n_pairs)


def optimizer_steps(order: np.ndarray, batch_size: int, grad_accum: int) -> list[list[np.ndarray]]:
    """Group an epoch's order into optimizer steps, each a list of micro-batches of indices.

    The last micro-batch and the last step may be short; the loss is averaged over the pairs a
    step really holds, so a short step is weighted correctly.
    """
    micro = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]


def pair_lengths(dataset: Any) -> np.ndarray:
    """(N, 2) token lengths of prompt + chosen and prompt + rejected for every pair."""
    prompt = np.array([len(x) for x in dataset["prompt_input_ids"]])
    chosen = np.array([len(x) for x in dataset["chosen_input_ids"]])
    rejected = np.array([len(x) for x in dataset["rejected_input_ids"]])
    return np.stack([prompt + chosen, prompt + rejected], axis=1)


def length_grouped_order(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_batches: int = 32
) -> np.ndarray:
    """A permutation whose consecutive `batch_size` chunks hold pairs of similar length.

    `lengths` is (N, 2) from `pair_lengths`. Shuffle, cut into groups of `group_batches`
    micro-batches, sort each group by the pair's longer row, cut it into micro-batches, then
    shuffle the micro-batches: padding shrinks while the batch order, and which pairs meet, stay
    random. Leftovers of the groups form the last batches. A function of (seed, epoch) only.
    """
    longest = lengths.max(axis=1)
    rng = np.random.default_rng([seed, epoch, 1])
    order = rng.permutation(len(longest))
    group = batch_size * group_batches
    full, leftover = [], []
    for start in range(0, len(order), group):
        members = order[start : start + group]
        members = members[np.argsort(-longest[members], kind="stable")]
        cut = len(members) - len(members) % batch_size
        full += [members[i : i + batch_size] for i in range(0, cut, batch_size)]
        leftover.append(members[cut:])
    tail = np.concatenate(leftover) if leftover else order[:0]
    tail = tail[np.argsort(-longest[tail], kind="stable")]
    batches = [full[i] for i in rng.permutation(len(full))]
    return np.concatenate(batches + [tail])


def padded_share(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Share of padding among all positions when `order` is cut into micro-batches.

    `lengths` is (N, 2) from `pair_lengths`; a micro-batch pads its 2B rows to its longest row.
    """
    padded = real = 0
    for start in range(0, len(order), batch_size):
        rows = lengths[order[start : start + batch_size]]
        padded += rows.size * int(rows.max())
        real += int(rows.sum())
    return 1.0 - real / padded if padded else 0.0
