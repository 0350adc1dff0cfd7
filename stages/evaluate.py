"""evaluate: models/base + models/policy + data/tokenized/eval + data/eval_sets ->
metrics/eval.json (headline figures, each extra held-out set's under sets.<name>),
reports/eval.json (every figure, the reference's, and the key that says which held-out pairs and
scoring they come from), reports/eval_extra.json (every figure of each extra set),
plots/eval_margins.csv (reward-margin histogram), and all of it in the policy's MLflow run."""

from pipeline.evaluate.heldout import comparison_key
from pipeline.evaluate.policy import evaluate, log_to_run, write_reports
from pipeline.params import load_params
from pipeline.resources import on_device
from pipeline.stage_io import MODEL_POLICY, run_stage
from pipeline.track import runs


def main() -> None:
    params = load_params()
    with on_device(params.eval.device) as runtime:
        evaluation = evaluate(MODEL_POLICY, params, runtime)
        key = comparison_key(params, runtime)
    write_reports(evaluation, key)
    runs.configure()
    log_to_run(runs.read_run_id(MODEL_POLICY), params, evaluation)
    print("\n".join(evaluation.lines()))


if __name__ == "__main__":
    run_stage(main)
