"""evaluate: models/base + models/policy + data/tokenized/eval -> metrics/eval.json (policy and
reference), plots/eval_margins.csv (reward-margin histogram)."""

import datasets
import mlflow
import numpy as np
from transformers import AutoTokenizer

from pipeline import stage_io
from pipeline.evaluate.metrics import evaluate_policy, headline, json_safe, margin_histogram
from pipeline.model import reference
from pipeline.model.loading import Runtime, freeze, pad_token_id, resolve_runtime
from pipeline.model.scoring import load_scorer, score_pairs
from pipeline.params import Params, load_params
from pipeline.resources import stage_share
from pipeline.stage_io import run_stage
from pipeline.track import runs


def main() -> None:
    params = load_params()
    runtime = resolve_runtime(params.eval.device)
    with stage_share(params.eval.device):
        evaluate(params, runtime)


def evaluate(params: Params, runtime: Runtime) -> None:
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(stage_io.MODEL_POLICY, trust_remote_code=trust)
    dataset = datasets.load_from_disk(str(stage_io.DATA_TOKENIZED / "eval"))
    # The reference side comes from the reference stage, computed once per base model and data.
    quantize = params.train.lora.quantize  # the reference a 4-bit policy trained against
    identity = reference.describe(
        stage_io.MODEL_BASE, stage_io.DATA_TOKENIZED / "eval", runtime, quantize
    )
    cached = reference.load(stage_io.DATA_REFERENCE / "eval", identity, len(dataset)).astype(
        np.float64
    )
    policy = freeze(load_scorer(stage_io.MODEL_POLICY, runtime, trust))
    policy_scores = score_pairs(
        policy, dataset, params.eval.batch_size, runtime, pad_token_id(tokenizer), "policy"
    )
    metrics, scored = evaluate_policy(
        policy_scores, (cached[:, 0], cached[:, 1]), dataset, params.train
    )
    stage_io.write_json_atomic(stage_io.REPORTS / "eval.json", json_safe(metrics))
    stage_io.write_json_atomic(stage_io.METRICS / "eval.json", json_safe(headline(metrics)))
    runs.configure()
    with mlflow.start_run(run_id=runs.read_run_id(stage_io.MODEL_POLICY)):
        runs.log_flat_metrics({k: v for k, v in metrics.items() if k != "reference"}, "eval/")
        runs.log_flat_metrics(metrics["reference"], "eval_reference/")
    stage_io.write_csv_atomic(
        stage_io.PLOTS / "eval_margins.csv", margin_histogram(scored), ("margin", "pairs")
    )
    print(
        f"win_rate {metrics['win_rate']:.4f} (reference {metrics['reference']['win_rate']:.4f}), "
        f"kendall_tau {metrics['kendall_tau']:.4f} over {metrics['kendall_questions']} questions"
    )


if __name__ == "__main__":
    run_stage(main)
