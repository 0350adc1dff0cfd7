"""The training plan: which pairs form each micro-batch and optimizer step, epoch by epoch.

Every order is a function of (seed, epoch) only, so a resumed run replays exactly the batches an
uninterrupted one would have used. Length grouping puts pairs of similar length together (less
padding) while the batch order stays random. Under torchrun a global micro-batch of
`batch_size * world` pairs is cut into one slice per rank.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.params import TrainParams
from pipeline.train.distributed import SINGLE, World, usable_order


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


def forward_parts(
    global_micro: np.ndarray, lengths: np.ndarray, world: World, budget: int
) -> list[np.ndarray]:
    """Cut a global micro-batch into parts whose forward stays within `budget` padded tokens
    (2 rows x pairs x longest row) on every rank; 0 = no limit.

    A micro-batch that fits is returned whole and untouched. Otherwise its pairs are sorted by
    length and cut greedily in units of one pair per rank, so every rank runs the same number of
    forwards (DDP and FSDP communicate in each) and a part never leaves a rank empty. A single
    pair longer than the budget forms a part of its own. The pairs, and so the step's summed loss
    and its gradient, are the same; only the grouping into forwards changes.
    """
    per_rank = -(-len(global_micro) // world.size)
    if not budget or 2 * per_rank * lengths[global_micro].max() <= budget:
        return [global_micro]
    ordered = global_micro[np.argsort(-lengths[global_micro].max(axis=1), kind="stable")]
    parts, start = [], 0
    while start < len(ordered):
        longest, units = lengths[ordered[start]].max(), 1  # a part's first pair is its longest
        while start + (units + 1) * world.size <= len(ordered) and (
            2 * (units + 1) * longest <= budget
        ):
            units += 1
        parts.append(ordered[start : start + units * world.size])
        start += units * world.size
    return parts


def epoch_plan(lengths: np.ndarray, params: TrainParams, epoch: int, world: World = SINGLE) -> Any:
    """The epoch's pair order: length-grouped or plain random, both a function of (seed, epoch).

    Groups are cut at the global micro-batch (batch_size pairs on each of `world.size` ranks).
    """
    size = params.batch_size * world.size
    if params.length_grouping:
        order = length_grouped_order(lengths, size, params.seed, epoch)
    else:
        order = epoch_order(len(lengths), params.seed, epoch)
    return usable_order(order, world)


def epoch_steps(
    lengths: np.ndarray, params: TrainParams, epoch: int, world: World = SINGLE
) -> list[list[np.ndarray]]:
    """The epoch's optimizer steps, each a list of global micro-batches of pair indices."""
    order = epoch_plan(lengths, params, epoch, world)
    return optimizer_steps(order, params.batch_size * world.size, params.grad_accum)


def total_steps(params: TrainParams, n_pairs: int, world: World = SINGLE) -> int:
    """Optimizer steps of the whole run: epochs x steps per epoch, capped by max_steps."""
    n_pairs = len(usable_order(np.arange(n_pairs), world))
    micro_batches = math.ceil(n_pairs / (params.batch_size * world.size))
    per_epoch = math.ceil(micro_batches / params.grad_accum)
    planned = per_epoch * params.epochs
    return min(planned, params.max_steps) if params.max_steps else planned


def padding_report(lengths: np.ndarray, params: TrainParams) -> dict[str, Any]:
    """Padded-token share of every epoch's micro-batches, configured vs plain random batching.

    (With packed batches on CUDA + flash-attention no padding is computed at all; this is the
    share the padded path would carry.)
    """
    configured = [
        padded_share(lengths, epoch_plan(lengths, params, e), params.batch_size)
        for e in range(params.epochs)
    ]
    random = [
        padded_share(lengths, epoch_order(len(lengths), params.seed, e), params.batch_size)
        for e in range(params.epochs)
    ]
    return {
        "padded_share": float(np.mean(configured)),
        "padded_share_random": float(np.mean(random)),
        "padded_share_per_epoch": [round(v, 4) for v in configured],
    }
