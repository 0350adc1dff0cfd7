"""subsample: data/raw -> data/subsampled/{train,eval}/ and reports/subsample.json (counts)."""

import json

from pipeline.data.subsample import subsample
from pipeline.params import load_params, save_resolved
from pipeline.stage_io import (
    DATA_RAW,
    DATA_SUBSAMPLED,
    REPORTS,
    atomic_dir,
    run_stage,
    write_json_atomic,
)


def main() -> None:
    params = load_params()
    manifest = json.loads((DATA_RAW / "train" / "manifest.json").read_text())
    with atomic_dir(DATA_SUBSAMPLED) as tmp:
        counts = subsample(
            DATA_RAW,
            tmp,
            fraction=params.data.fraction,
            source_train_rows=manifest["source_rows"],
            eval_size=params.data.eval_size,
            seed=params.data.seed,
        )
        save_resolved(params, tmp, "subsample")
    write_json_atomic(REPORTS / "subsample.json", counts)
    print(", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_stage(main)
