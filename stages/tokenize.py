"""tokenize: models/base tokenizer + data/subsampled -> data/tokenized/{train,eval}/ (Arrow shards)
and reports/tokenize.json (drop and truncation counts, token-length percentiles)."""

import math
import os
import time

import datasets
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from pipeline.atomic import atomic_dir, write_json_atomic
from pipeline.params import load_params, save_resolved
from pipeline.paths import DATA_SUBSAMPLED, DATA_TOKENIZED, MODEL_BASE, REPORTS
from pipeline.schema import SUBSAMPLED_SCHEMA, conform
from pipeline.tokenization import tokenize_dataset


def main() -> None:
    # Worker processes tokenize in parallel already; the Rust pool inside each would oversubscribe.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    params = load_params()
    tokenizer = AutoTokenizer.from_pretrained(
        MODEL_BASE, trust_remote_code=params.model.trust_remote_code
    )
    report = {}
    with atomic_dir(DATA_TOKENIZED) as tmp:
        for split in ("train", "eval"):
            path = DATA_SUBSAMPLED / split / "data.parquet"
            table = conform(pq.read_table(path), SUBSAMPLED_SCHEMA, str(path))
            started = time.perf_counter()
            kept, report[split] = tokenize_dataset(
                datasets.Dataset(table), tokenizer, params.tokenize, split
            )
            seconds = time.perf_counter() - started  # worker start-up included, as users see it
            report[split]["pairs_per_s"] = round(report[split]["pairs_in"] / seconds, 1)
            shards = max(1, math.ceil(len(kept) / params.tokenize.pairs_per_shard))
            kept.save_to_disk(str(tmp / split), num_shards=shards)
            report[split]["shards"] = shards
        save_resolved(params, tmp, "tokenize")
    write_json_atomic(REPORTS / "tokenize.json", report)
    for split, r in report.items():
        print(
            f"{split}: kept {r['pairs_kept']}/{r['pairs_in']} pairs in {r['shards']} shards, "
            f"dropped {r['dropped']}, truncated {r['truncated']}, {r['pairs_per_s']} pairs/s"
        )


if __name__ == "__main__":
    main()
