"""train: models/base + data/tokenized/train (+ data/reference/train) -> models/policy/ (HF
folder + MLflow run id), metrics/train.json, reports/train.json, plots/train.csv.

The work is `pipeline.train.recipe.DPORecipe`, built from the workspace by
`pipeline.train.setup`. A run stopped part-way resumes from checkpoints/train/<run key>/ at the
repository root (and continues the same MLflow run) when run again with the same inputs,
whichever copy of the repository it runs in. With train.nproc > 1 the stage claims that many GPUs
and starts itself under torchrun, one process per GPU (DDP or FSDP).
"""

import os

from pipeline.params import load_params
from pipeline.stage_io import run_stage
from pipeline.train import setup


def main() -> None:
    params = load_params()
    if params.train.nproc > 1 and "LOCAL_RANK" not in os.environ:  # the launcher
        raise SystemExit(setup.start_ranks(params))
    with setup.stage_recipe(params) as recipe:  # every rank, on its share of the machine
        recipe.train()
        setup.save_outputs(recipe, params)


if __name__ == "__main__":
    run_stage(main)
