"""What the tokenize stage reports of each split: pairs in and kept, drops by reason, truncations,
token-length percentiles of the kept pairs, and the stage's summary line."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DROP_REASONS = ("empty_completion", "identical_completions", "no_room_for_answer")
LENGTHS = ("prompt", "chosen", "rejected")  # the parts of a pair whose token counts are reported


def split_report(table: Any, lengths: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts by drop reason, truncation counts and token-length percentiles of kept pairs, from
    the tokenized rows' drop_reason and truncated columns (Arrow compute: no Python row)."""
    reasons = pc.value_counts(table["drop_reason"])
    counts = dict(
        zip(reasons.field("values").to_pylist(), reasons.field("counts").to_pylist(), strict=True)
    )
    pairs, dropped = len(table), {reason: counts.get(reason, 0) for reason in DROP_REASONS}
    truncated = {
        name: int(pc.sum(pc.list_element(table["truncated"], i)).as_py() or 0)
        for i, name in enumerate(("prompt", "chosen", "rejected"))
    }
    return {
        "pairs_in": pairs,
        "pairs_kept": pairs - sum(dropped.values()),
        "dropped": dropped,
        "truncated": truncated,
        "drop_share": sum(dropped.values()) / max(pairs, 1),
        "lengths": {name: percentiles(values) for name, values in lengths.items()},
    }


def percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    points = np.percentile(np.asarray(values), [50, 90, 99])
    return {
        "p50": float(points[0]),
        "p90": float(points[1]),
        "p99": float(points[2]),
        "max": float(max(values)),
        "mean": float(np.mean(values)),
    }


def kept_lengths(batches: list[list[pa.Array]]) -> dict[str, np.ndarray]:
    """Token counts of the kept pairs, by part, and of each pair's longer side with its prompt."""
    lengths = {
        name: np.concatenate([np.zeros(0, np.int64)] + [b[i].to_numpy() for b in batches])
        for i, name in enumerate(LENGTHS)
    }
    lengths["pair_total"] = lengths["prompt"] + np.maximum(lengths["chosen"], lengths["rejected"])
    return lengths


def describe_report(report: dict[str, dict[str, Any]]) -> str:
    """The stage's summary lines, one per split."""
    return "\n".join(
        f"{split}: kept {r['pairs_kept']}/{r['pairs_in']} pairs in {r['shards']} shards, "
        f"dropped {r['dropped']}, truncated {r['truncated']}, {r['pairs_per_s']} pairs/s"
        for split, r in report.items()
    )
