"""eval_sets: models/base + eval.datasets -> data/eval_sets/<name>/ (each extra held-out set's
pairs, token ids and reference log-probs) and reports/eval_sets.json. Its own stage, so the
reference scores of an extra set are computed once and an experiment that changes train.* or
loss.* reuses them; with no extra set it writes an empty folder and loads nothing."""

from pipeline.evaluate.sets import prepare_sets
from pipeline.params import load_params, save_resolved
from pipeline.resources import on_device
from pipeline.stage_io import DATA_EVAL_SETS, REPORTS, atomic_dir, run_stage, write_json_atomic


def main() -> None:
    params = load_params()
    reports = {}
    with atomic_dir(DATA_EVAL_SETS) as tmp:
        if params.eval.datasets:
            with on_device(params.eval.device) as runtime:
                reports = prepare_sets(params, runtime, tmp)
        save_resolved(params, tmp, "eval_sets")
    write_json_atomic(REPORTS / "eval_sets.json", reports)


if __name__ == "__main__":
    run_stage(main)
