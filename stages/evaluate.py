"""evaluate: models/base + models/policy + data/tokenized/eval -> metrics/eval.json (policy and
reference), plots/eval_margins.csv (reward-margin histogram)."""

import datasets
import mlflow
import numpy as np
from transformers import AutoTokenizer

from pipeline import reference, tracking
from pipeline.atomic import write_json_atomic
from pipeline.csvlog import write_csv_atomic
from pipeline.evaluation import margin_histogram, pair_losses, reward_metrics, score_pairs
from pipeline.modeling import freeze, load_scorer, pad_token_id, resolve_runtime
from pipeline.params import load_params
from pipeline.paths import DATA_REFERENCE, DATA_TOKENIZED, METRICS, MODEL_BASE, MODEL_POLICY, PLOTS


def json_safe(metrics: dict) -> dict:
    """NaN (e.g. tau when no question has 3 distinct answers) -> null: strict JSON for tools."""
    return {
        k: json_safe(v) if isinstance(v, dict) else (None if v != v else v)
        for k, v in metrics.items()
    }


def main() -> None:
    params = load_params()
    runtime = resolve_runtime(params.eval.device)
    trust = params.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(MODEL_POLICY, trust_remote_code=trust)
    pad = pad_token_id(tokenizer)
    dataset = datasets.load_from_disk(str(DATA_TOKENIZED / "eval"))
    # The reference side comes from the reference stage, computed once per base model and data.
    identity = reference.describe(MODEL_BASE, DATA_TOKENIZED / "eval", runtime)
    cached = reference.load(DATA_REFERENCE / "eval", identity, len(dataset)).astype(np.float64)
    policy = freeze(load_scorer(MODEL_POLICY, runtime, trust))
    scored = {
        "reference": (cached[:, 0], cached[:, 1]),
        "policy": score_pairs(policy, dataset, params.eval.batch_size, runtime, pad, "policy"),
    }
    policy_scored = pair_losses(scored["policy"], scored["reference"], dataset, params.train)
    metrics = reward_metrics(policy_scored, dataset)
    # The reference judged as the policy: every log-ratio is 0, so its win rate is exactly 0.5
    # (reference-free variants: the base model's own ranking, the baseline to beat).
    baseline = pair_losses(scored["reference"], scored["reference"], dataset, params.train)
    metrics["reference"] = reward_metrics(baseline, dataset)
    write_json_atomic(METRICS / "eval.json", json_safe(metrics))
    tracking.configure()
    with mlflow.start_run(run_id=tracking.read_run_id(MODEL_POLICY)):
        tracking.log_flat_metrics({k: v for k, v in metrics.items() if k != "reference"}, "eval/")
        tracking.log_flat_metrics(metrics["reference"], "eval_reference/")
    write_csv_atomic(
        PLOTS / "eval_margins.csv",
        margin_histogram(policy_scored),
        ("margin", "pairs"),
    )
    print(
        f"win_rate {metrics['win_rate']:.4f} (reference {metrics['reference']['win_rate']:.4f}), "
        f"kendall_tau {metrics['kendall_tau']:.4f} over {metrics['kendall_questions']} questions"
    )


if __name__ == "__main__":
    main()
