"""tokenize: models/base tokenizer + data/subsampled -> data/tokenized/{train,eval}/ (Arrow shards)
and reports/tokenize.json (drop and truncation counts, token-length percentiles)."""

import os

from transformers import AutoConfig, AutoTokenizer

from pipeline.data.tokenization import tokenize_split
from pipeline.data.tokenize_report import describe_report
from pipeline.model.positions import check_positions
from pipeline.params import load_params, save_resolved
from pipeline.stage_io import (
    DATA_SUBSAMPLED,
    DATA_TOKENIZED,
    MODEL_BASE,
    REPORTS,
    atomic_dir,
    run_stage,
    write_json_atomic,
)


def main() -> None:
    # Worker processes tokenize in parallel already; the Rust pool inside each would oversubscribe.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    params = load_params()
    trust = params.model.trust_remote_code
    config = AutoConfig.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    check_positions(config, {"tokenize.max_length": params.tokenize.max_length}, trust)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_BASE, trust_remote_code=trust)
    with atomic_dir(DATA_TOKENIZED) as tmp:
        report = {
            split: tokenize_split(
                DATA_SUBSAMPLED / split / "data.parquet", tmp / split, tokenizer, params.tokenize
            )
            for split in ("train", "eval")
        }
        save_resolved(params, tmp, "tokenize")
    write_json_atomic(REPORTS / "tokenize.json", report)
    print(describe_report(report))


if __name__ == "__main__":
    run_stage(main)
