"""Parity with TRL 1.16's DPOTrainer, the reference implementation (test time only).

Same tiny Qwen3 (the offline demo model, fp32, CPU), same pairs (the demo sample), same token ids:
the pipeline's log-probs, rewards, loss, gradients, loss variants and a 20-step training
trajectory are compared with TRL's. Run with `-s` to see the largest differences measured.

How TRL 1.16 handles data, read from trl/trainer/dpo_trainer.py, and where the pipeline differs
(each difference is tested from both sides below):

* Tokenization. TRL appends the EOS *text* to each completion (unless the string already ends
  with it), tokenizes prompt and prompt + completion jointly (no special tokens are added: Qwen
  has no BOS), and starts the completion where the two id lists diverge. The pipeline tokenizes
  the prompt and the completion separately and appends the EOS *id*. The ids are equal when the
  prompt ends on a pre-token boundary (a template ending in a newline). With the project's
  template, which ends in a space, byte-level BPE merges that space into the answer's first word:
  TRL then drops the space from the prompt and scores the merged token as part of the answer;
  the pipeline keeps the space in the prompt (same text, different ids).
* EOS. A completion ending in repeated EOS keeps them all in TRL; the pipeline keeps exactly one.
  An empty completion is trained on in TRL (EOS only); the pipeline drops the pair.
* Truncation. TRL cuts prompt + completion to `max_length` in the collator, keeping the start,
  and drops pairs whose prompt alone fills it. The pipeline shortens the *question* so the
  rendered prompt fits `max_prompt_length`, then cuts completions to the room left. Whenever the
  prompt fits, both give the same ids (tested here with truncated completions).
* Batches: both put `[chosen; rejected]` in one right-padded batch with a completion mask, and
  score log-prob of token t+1 from position t, completion tokens only.
* `rewards/accuracies`: TRL counts strict `>`; the pipeline counts a tie as one half, so at step 1
  (policy == reference, every reward 0) TRL logs 0.0 and the pipeline 0.5.
* `label_smoothing` with the sigmoid loss: TRL 1.16 ignores it (its DPOTrainer has no
  conservative DPO); `pipeline.objective.losses` applies cDPO.
* IPO: both length-normalise; TRL divides by the unshifted completion mask's sum, the pipeline by
  the tokens it scores (mask[:, 1:]). They differ only for an empty prompt, which the pipeline
  never makes.
* NLL term (RPO): TRL's `sft` loss is the token-level mean over all chosen tokens of the batch;
  the pipeline averages per pair (each pair weighs the same). Equal only for equal lengths.
* SimPO: not in DPOTrainer; compared with TRL's experimental CPOTrainer `cpo_loss` ("simpo").
* Logged learning rate: TRL logs the rate a step used; the pipeline's log row holds the rate
  after that step's scheduler update (the next step's).

Precision: summed log-probs are O(100) in fp32, where one ulp is ~1e-5, so they are compared with
a relative tolerance of 1e-5 and per token (|difference| / tokens <= 1e-5), and the rewards (beta
times a difference of two such sums) per token as well; losses and gradients with 1e-5, the
20-step loss trajectory with 1e-4.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

trl = pytest.importorskip(
    "trl",
    minversion="1.16",
    reason="TRL is the reference for the parity tests only: pip install -e '.[reference]'",
)

import datasets  # noqa: E402
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from pipeline.data.tokenization import TokenizedPair  # noqa: E402
from pipeline.model.batches import PairBatch, collate_pairs  # noqa: E402
from pipeline.model.loading import freeze, load_causal_lm, pad_token_id  # noqa: E402
from pipeline.model.reference import ModelReference  # noqa: E402
from pipeline.model.scoring import CompletionScorer, batch_logps  # noqa: E402
from pipeline.objective.losses import PairLogps, compute_loss  # noqa: E402
from pipeline.objective.metrics import completion_token_counts  # noqa: E402
from pipeline.params import (  # noqa: E402
    LoraParams,
    TokenizeParams,
    TrainParams,
    parse_section,
    read_yaml,
)
from pipeline.train.adapters import AdaptersOffReference, add_adapters  # noqa: E402
from pipeline.train.plan import epoch_plan, pair_lengths  # noqa: E402
from tests.helpers import CPU, REPO, fit, objective, step_metrics, tokenize_pair  # noqa: E402
from tests.plain_dpo import full_logits_logps  # noqa: E402

# One intra-op thread (tests/conftest.py). TRL 1.16 calls transformers' deprecated
# `is_gradient_checkpointing` on every reference forward.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated"),
]

BETA = 0.1
N_PAIRS = 16
BATCH = 4
STEPS = 20
# Ends on a pre-token boundary (":\n"), so joint and separate tokenization agree.
SAFE_TEMPLATE = "Question: {question}\n\nAnswer:\n"
# Short sequences keep the test fast and the fp32 sums small; completions do get truncated.
MAX_LENGTH = 64
MAX_PROMPT_LENGTH = 40


def report(name: str, value: float) -> None:
    """The largest differences, shown with `pytest -s`."""
    print(f"\n[trl parity] {name}: {value:.3g}")


def section(name: str, cls: type, **overrides: Any) -> Any:
    """A params section from params.yaml with overrides, so new keys keep their defaults."""
    return parse_section(name, {**read_yaml(REPO / "params.yaml")[name], **overrides}, cls)


def tokenize_params(template: str, max_length: int, max_prompt_length: int) -> TokenizeParams:
    return section(
        "tokenize",
        TokenizeParams,
        template=template,
        use_chat_template=False,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )


def ours(
    tok: PreTrainedTokenizerBase, rows: list[dict], params: TokenizeParams
) -> list[TokenizedPair]:
    return [
        tokenize_pair(tok, r["question"], r["response_j"], r["response_k"], params) for r in rows
    ]


def texts(rows: list[dict], template: str) -> datasets.Dataset:
    """TRL's standard (non-conversational) prompt/chosen/rejected format."""
    return datasets.Dataset.from_dict(
        {
            "prompt": [template.replace("{question}", r["question"]) for r in rows],
            "chosen": [r["response_j"] for r in rows],
            "rejected": [r["response_k"] for r in rows],
        }
    )


def columns(pairs: list[TokenizedPair]) -> dict[str, list[list[int]]]:
    return {
        "prompt_input_ids": [p.prompt for p in pairs],
        "chosen_input_ids": [p.chosen for p in pairs],
        "rejected_input_ids": [p.rejected for p in pairs],
    }


def trl_config(output_dir: Path, **overrides: Any) -> Any:
    """DPOConfig matching the pipeline: fp32 CPU, no checkpointing, no shuffling, no hub."""
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,
        "max_length": MAX_LENGTH,
        "per_device_train_batch_size": BATCH,
        "train_sampling_strategy": "sequential",
        "beta": BETA,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    return trl.DPOConfig(**{**settings, **overrides})


def load(model_dir: Path) -> PreTrainedModel:
    return load_causal_lm(model_dir, CPU, trust_remote_code=False)


def grad_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))


@pytest.fixture(scope="module")
def tok(demo_model_dir: Path) -> PreTrainedTokenizerBase:
    # A private copy: TRL sets attributes on the tokenizer it is given.
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def rows(demo_dataset_dir: Path, tok: PreTrainedTokenizerBase) -> list[dict]:
    """The first N_PAIRS demo pairs whose prompt fits MAX_PROMPT_LENGTH and that are kept."""
    params = tokenize_params(SAFE_TEMPLATE, MAX_LENGTH, MAX_PROMPT_LENGTH)
    picked = []
    for path in sorted((demo_dataset_dir / "data" / "rl").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            pair = ours(tok, [row], params)[0]
            if not pair.drop_reason and not pair.truncated[0]:
                picked.append(row)
            if len(picked) == N_PAIRS:
                return picked
    raise AssertionError("the demo sample has too few short pairs")


# ---------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer_trainer(
    tok: PreTrainedTokenizerBase, rows: list[dict], demo_model_dir: Path, tmp_path_factory: Any
) -> Any:
    """A DPOTrainer whose dataset preparation (TRL's tokenization) the tests call."""
    return trl.DPOTrainer(
        model=load(demo_model_dir),
        ref_model=load(demo_model_dir),
        args=trl_config(tmp_path_factory.mktemp("trl-tok"), max_length=None),
        train_dataset=texts(rows[:2], SAFE_TEMPLATE),
        processing_class=tok,
    )


def trl_tokenize(trainer: Any, dataset: datasets.Dataset) -> datasets.Dataset:
    return trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, "parity")


def test_token_ids_equal_trl_with_a_boundary_safe_template(
    tokenizer_trainer: Any, tok: PreTrainedTokenizerBase, rows: list[dict]
) -> None:
    theirs = trl_tokenize(tokenizer_trainer, texts(rows, SAFE_TEMPLATE))
    mine = ours(tok, rows, tokenize_params(SAFE_TEMPLATE, 4096, 2048))
    assert theirs["prompt_ids"] == [p.prompt for p in mine]
    assert theirs["chosen_ids"] == [p.chosen for p in mine]
    assert theirs["rejected_ids"] == [p.rejected for p in mine]
    assert all(p.chosen[-1] == tok.eos_token_id for p in mine)  # one EOS id, no BOS anywhere
    assert tok.bos_token_id is None or all(tok.bos_token_id not in p.prompt for p in mine)


def test_project_template_moves_the_boundary_space_in_trl(
    tokenizer_trainer: Any, tok: PreTrainedTokenizerBase, rows: list[dict]
) -> None:
    template = read_yaml(REPO / "params.yaml")["tokenize"]["template"]
    assert template.endswith(" "), "this test documents the trailing-space template"
    theirs = trl_tokenize(tokenizer_trainer, texts(rows, template))
    mine = ours(tok, rows, tokenize_params(template, 4096, 2048))
    differing = 0
    for pair, prompt, chosen in zip(mine, theirs["prompt_ids"], theirs["chosen_ids"], strict=True):
        if prompt == pair.prompt:
            assert chosen == pair.chosen  # this answer's first token does not merge
            continue
        differing += 1
        # TRL: the prompt loses its trailing space token, the answer starts with " word".
        assert prompt == pair.prompt[:-1]
        assert tok.decode(pair.prompt[-1:]) == " "
        assert chosen[0] != pair.chosen[0]
        assert tok.decode(prompt + chosen) == tok.decode(pair.prompt + pair.chosen)
    assert differing > 0


def test_eos_and_empty_completions_differ_from_trl(
    tokenizer_trainer: Any, tok: PreTrainedTokenizerBase
) -> None:
    eos = tok.eos_token
    edge = {"question": "Why?", "response_k": "Because."}
    cases = [dict(edge, response_j=text) for text in (f"Yes.{eos}", f"Yes.{eos}{eos}", "")]
    theirs = trl_tokenize(tokenizer_trainer, texts(cases, SAFE_TEMPLATE))
    mine = ours(tok, cases, tokenize_params(SAFE_TEMPLATE, 4096, 2048))
    one_eos = tok("Yes.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert theirs["chosen_ids"][0] == mine[0].chosen == one_eos  # EOS already there: not doubled
    assert theirs["chosen_ids"][1] == one_eos + [tok.eos_token_id]  # TRL keeps both
    assert mine[1].chosen == one_eos  # the pipeline keeps one
    assert theirs["chosen_ids"][2] == [tok.eos_token_id]  # TRL trains on an EOS-only answer
    assert mine[2].drop_reason == "empty_completion"  # the pipeline drops the pair


def test_long_prompts_are_dropped_by_trl_and_shortened_here(
    tokenizer_trainer: Any, tok: PreTrainedTokenizerBase, rows: list[dict], tmp_path: Path
) -> None:
    row = max(rows, key=lambda r: len(r["question"]))
    mine = ours(tok, [row], tokenize_params(SAFE_TEMPLATE, 24, 12))[0]
    assert len(ours(tok, [row], tokenize_params(SAFE_TEMPLATE, 4096, 2048))[0].prompt) >= 24
    args = trl_config(tmp_path, max_length=24)
    theirs = tokenizer_trainer._prepare_dataset(texts([row], SAFE_TEMPLATE), tok, args, "long")
    assert len(theirs) == 0  # TRL: the prompt alone fills max_length, the pair is dropped
    # The pipeline: the question is shortened, the template's end survives, the answer fits.
    assert not mine.drop_reason and mine.truncated[0] and len(mine.prompt) <= 12
    assert tok.decode(mine.prompt).endswith("Answer:\n")
    assert len(mine.prompt) + len(mine.chosen) <= 24


# ---------------------------------------------------------------- one batch


@dataclasses.dataclass
class OneBatch:
    trainer: Any  # TRL's DPOTrainer; trainer.model is its (fused-head) copy of the policy
    policy: torch.nn.Module  # the pipeline's copy, same weights
    reference: torch.nn.Module
    trl_batch: dict[str, torch.Tensor]
    batch: PairBatch


@pytest.fixture(scope="module")
def one_batch(
    demo_model_dir: Path, tok: PreTrainedTokenizerBase, rows: list[dict], tmp_path_factory: Any
) -> OneBatch:
    policy = load(demo_model_dir)
    # Move the policy off the reference, so rewards and margins are not 0 and (with this seed on
    # the pretrained demo base) the batch holds pairs ranked both ways: accuracies below 1.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    mine = copy.deepcopy(policy)  # before TRL patches the forward of its copy
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=load(demo_model_dir),
        args=trl_config(tmp_path_factory.mktemp("trl-batch")),
        train_dataset=texts(rows[:BATCH], SAFE_TEMPLATE),
        processing_class=tok,
    )
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    pairs = ours(tok, rows[:BATCH], tokenize_params(SAFE_TEMPLATE, MAX_LENGTH, MAX_PROMPT_LENGTH))
    batch = collate_pairs(columns(pairs), pad_token_id(tok))
    return OneBatch(trainer, mine.train(), freeze(load(demo_model_dir)), trl_batch, batch)


def trl_sequence_logps(model: torch.nn.Module, trl_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) summed completion log-probs exactly as DPOTrainer computes them (fused LM head)."""
    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    out = model(
        input_ids=trl_batch["input_ids"],
        attention_mask=trl_batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
    )
    return out.log_probs.sum(dim=1)


def test_batches_are_identical(one_batch: OneBatch) -> None:
    # Same ids, masks and padding, with completions truncated to MAX_LENGTH on both sides.
    assert torch.equal(one_batch.trl_batch["input_ids"], one_batch.batch.input_ids)
    assert torch.equal(one_batch.trl_batch["attention_mask"], one_batch.batch.attention_mask)
    assert torch.equal(one_batch.trl_batch["completion_mask"], one_batch.batch.completion_mask)
    assert one_batch.batch.input_ids.shape[1] == MAX_LENGTH  # something was truncated


def test_logps_rewards_loss_and_gradients_match_trl(one_batch: OneBatch) -> None:
    trainer, batch = one_batch.trainer, one_batch.batch
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    one_batch.policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        trl_policy = trl_sequence_logps(trainer.model, one_batch.trl_batch)
        trl_ref = trl_sequence_logps(trainer.ref_model, one_batch.trl_batch)
        scorer = batch_logps(CompletionScorer(one_batch.policy), batch, CPU)
        ref = full_logits_logps(one_batch.reference, batch)
    policy = full_logits_logps(one_batch.policy, batch)  # the plain full-logits path, with grad
    tokens = completion_token_counts(batch.completion_mask)
    for name, mine, theirs in (
        ("policy", policy.detach(), trl_policy),
        ("scorer", scorer, trl_policy),
        ("ref", ref, trl_ref),
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        per_token = ((mine - theirs).abs() / tokens).max().item()
        assert per_token <= 1e-5
        report(f"{name} summed log-probs, max |diff|", (mine - theirs).abs().max().item())
        report(f"{name} summed log-probs, max |diff| / tokens", per_token)

    # The pipeline's loss exactly as the trainer forms it: sum over pairs / pairs.
    logps = PairLogps.from_concatenated(policy, ref, tokens, batch.n_pairs)
    pc, pr = logps.policy_chosen, logps.policy_rejected
    out = compute_loss(logps, objective("sigmoid", BETA))
    losses, chosen_rewards, rejected_rewards = out.losses, out.chosen_rewards, out.rejected_rewards
    loss = losses.sum() / batch.n_pairs
    trainer._metrics["train"].clear()
    trl_loss = trainer.compute_loss(trainer.model, one_batch.trl_batch)
    report("loss |diff|", abs(loss.item() - trl_loss.item()))
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)

    # A reward is beta times a difference of two fp32 sums: compare it per token, like them.
    trl_chosen, trl_rejected = (BETA * (trl_policy - trl_ref)).chunk(2)
    chosen_tokens, rejected_tokens = logps.chosen_tokens, logps.rejected_tokens
    rewards_diff = torch.cat([chosen_rewards - trl_chosen, rejected_rewards - trl_rejected]).abs()
    per_token = (rewards_diff / (BETA * torch.cat([chosen_tokens, rejected_tokens]))).max().item()
    report("per-pair rewards, max |diff|", rewards_diff.max().item())
    report("per-pair rewards, max |diff| / (beta * tokens)", per_token)
    assert rewards_diff.max().item() <= 1e-4 and per_token <= 1e-5
    nll = -pc.detach() / chosen_tokens
    metrics = step_metrics(losses.detach(), chosen_rewards, rejected_rewards, pc.detach(), pr, nll)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["rewards/margins"] != 0 and 0 < metrics["rewards/accuracies"] < 1
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == pytest.approx(logged[key], abs=1e-5), key  # no ties: same win rate
    for key in ("logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(logged[key], rel=1e-5), key

    loss.backward()
    trl_loss.backward()
    named = zip(one_batch.policy.named_parameters(), trainer.model.named_parameters(), strict=True)
    grad_diff = 0.0
    for (name, mine), (their_name, theirs) in named:
        assert name == their_name
        grad_diff = max(grad_diff, (mine.grad - theirs.grad).abs().max().item())
    norm_diff = abs(grad_norm(one_batch.policy) - grad_norm(trainer.model))
    report("gradients, max |diff|", grad_diff)
    report("gradient norm |diff|", norm_diff)
    assert grad_diff <= 1e-5 and norm_diff <= 1e-5


# ---------------------------------------------------------------- loss variants


@pytest.fixture(scope="module")
def variant_logps(one_batch: OneBatch) -> PairLogps:
    with torch.no_grad():
        policy = full_logits_logps(one_batch.policy, one_batch.batch)
        ref = full_logits_logps(one_batch.reference, one_batch.batch)
    tokens = completion_token_counts(one_batch.batch.completion_mask)
    return PairLogps.from_concatenated(policy, ref, tokens, one_batch.batch.n_pairs)


def trl_loss(trainer: Any, batch: dict, loss_types: list[str], **settings: Any) -> float:
    """DPOTrainer's loss on `batch` with the given loss_type list (and weights / smoothing)."""
    trainer.loss_types = loss_types
    trainer.loss_weights = settings.get("weights", [1.0] * len(loss_types))
    trainer.label_smoothing = settings.get("label_smoothing", 0.0)
    try:
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()
    finally:  # leave the module's trainer as it was built
        trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = ["sigmoid"], [1.0], 0.0


@pytest.mark.parametrize(
    ("name", "label_smoothing"),
    [("sigmoid", 0.0), ("robust", 0.1), ("robust", 0.3), ("ipo", 0.0), ("hinge", 0.0)],
)
def test_loss_variants_match_trl(
    one_batch: OneBatch, variant_logps: PairLogps, name: str, label_smoothing: float
) -> None:
    theirs = trl_loss(
        one_batch.trainer, one_batch.trl_batch, [name], label_smoothing=label_smoothing
    )
    mine = compute_loss(variant_logps, objective(name, BETA, label_smoothing=label_smoothing))
    report(f"{name} (eps {label_smoothing}) loss |diff|", abs(mine.losses.mean().item() - theirs))
    assert mine.losses.mean().item() == pytest.approx(theirs, rel=1e-5, abs=1e-5)


def test_trl_ignores_label_smoothing_for_sigmoid(
    one_batch: OneBatch, variant_logps: PairLogps
) -> None:
    # TRL reports a batch mean only, so look at the pair with the largest margin on its own.
    eps, i = 0.2, int(variant_logps.margin().abs().argmax())
    single = one_batch.trainer.data_collator([one_batch.trainer.train_dataset[i]])
    theirs = trl_loss(one_batch.trainer, single, ["sigmoid"], label_smoothing=eps)
    plain = compute_loss(variant_logps, objective("sigmoid", BETA)).losses[i].item()
    conservative = compute_loss(variant_logps, objective("sigmoid", BETA, label_smoothing=eps))
    assert theirs == pytest.approx(plain, abs=1e-5)
    # cDPO adds eps * beta * h (softplus(z) - softplus(-z) = z): the term TRL leaves out.
    shift = eps * BETA * variant_logps.margin()[i].item()
    assert abs(shift) > 1e-3
    assert conservative.losses[i].item() - theirs == pytest.approx(shift, abs=1e-5)


def test_nll_term_is_per_pair_here_and_per_token_in_trl(
    one_batch: OneBatch, variant_logps: PairLogps
) -> None:
    weight = 0.5
    theirs = trl_loss(
        one_batch.trainer, one_batch.trl_batch, ["sigmoid", "sft"], weights=[1.0, weight]
    )
    mine = compute_loss(variant_logps, objective("sigmoid", BETA, sft_weight=weight))
    sigmoid = compute_loss(variant_logps, objective("sigmoid", BETA)).losses.mean().item()
    tokens = variant_logps.chosen_tokens.double()
    token_mean_nll = float((mine.nll.double() * tokens).sum() / tokens.sum())
    report(
        "sigmoid + sft loss |diff| (token-weighted NLL)",
        abs(sigmoid + weight * token_mean_nll - theirs),
    )
    assert theirs == pytest.approx(sigmoid + weight * token_mean_nll, abs=1e-5)
    assert mine.losses.mean().item() == pytest.approx(sigmoid + weight * mine.nll.mean().item())
    assert len(set(tokens.tolist())) > 1  # lengths differ, so the two conventions do too
    assert mine.losses.mean().item() != pytest.approx(theirs, abs=1e-4)


def test_ipo_counts_differ_from_trl_only_without_a_prompt(
    one_batch: OneBatch, tok: PreTrainedTokenizerBase, rows: list[dict]
) -> None:
    # TRL divides by the completion mask's sum, the pipeline by the tokens it scores. With no
    # prompt the first answer token is not scored (nothing predicts it): the counts differ by one.
    pair = ours(tok, rows[:1], tokenize_params(SAFE_TEMPLATE, MAX_LENGTH, MAX_PROMPT_LENGTH))[0]
    example = {"prompt_ids": [], "chosen_ids": pair.chosen, "rejected_ids": pair.rejected}
    trl_batch = one_batch.trainer.data_collator([example])
    theirs = trl_loss(one_batch.trainer, trl_batch, ["ipo"])
    batch = collate_pairs(
        {
            "prompt_input_ids": [[]],
            "chosen_input_ids": [pair.chosen],
            "rejected_input_ids": [pair.rejected],
        },
        pad_token_id(tok),
    )
    with torch.no_grad():
        policy = full_logits_logps(one_batch.policy, batch)
        ref = full_logits_logps(one_batch.reference, batch)
    scored = completion_token_counts(batch.completion_mask)
    unshifted = batch.completion_mask.sum(dim=1)
    assert (unshifted == scored + 1).all()
    mine = compute_loss(PairLogps.from_concatenated(policy, ref, scored, 1), objective("ipo", BETA))
    as_trl = compute_loss(
        PairLogps.from_concatenated(policy, ref, unshifted, 1), objective("ipo", BETA)
    )
    assert as_trl.losses.item() == pytest.approx(theirs, rel=1e-5, abs=1e-5)
    assert abs(mine.losses.item() - theirs) > 1e-3


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_simpo_matches_trl_cpo(variant_logps: PairLogps, gamma: float) -> None:
    cpo = pytest.importorskip("trl.experimental.cpo", reason="TRL's SimPO lives in CPOTrainer")
    beta = 2.0
    free = dataclasses.replace(
        variant_logps,
        ref_chosen=torch.zeros_like(variant_logps.ref_chosen),
        ref_rejected=torch.zeros_like(variant_logps.ref_rejected),
    )
    mine = compute_loss(free, objective("simpo", beta, gamma=gamma))
    # cpo_loss reads only these attributes of the trainer; it takes per-token average log-probs.
    fake = types.SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=0.0,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    losses, chosen_rewards, rejected_rewards = cpo.CPOTrainer.cpo_loss(fake, *free.average_policy())
    report(f"simpo (gamma {gamma}) loss max |diff|", (mine.losses - losses).abs().max().item())
    torch.testing.assert_close(mine.losses, losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine.chosen_rewards, chosen_rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine.rejected_rewards, rejected_rewards, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 20 optimizer steps


def pre_ordered(rows: list[dict], order: np.ndarray) -> datasets.Dataset:
    return texts([rows[int(i)] for i in order], SAFE_TEMPLATE)


def trajectories(
    model_dir: Path,
    tok: PreTrainedTokenizerBase,
    rows: list[dict],
    tmp_path: Path,
    steps: int,
    lr: float,
    lora: LoraParams | None = None,
) -> tuple[list[dict], list[dict]]:
    """`steps` optimizer steps of the pipeline and of TRL's DPOTrainer on the same pairs, order,
    schedule and seed -> (the pipeline's log rows, TRL's). With `lora`, both train the same peft
    adapters (same seed, same initial weights) and take the reference with the adapters off."""
    params = section(
        "train",
        TrainParams,
        lr=lr,
        epochs=-(-steps * BATCH // N_PAIRS),  # enough epochs for `steps`, as few as possible
        batch_size=BATCH,
        grad_accum=1,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=steps,
        seed=3,
        cached_reference=False,
        length_grouping=False,
        device="cpu",
        nproc=1,
        log_every=1,
        save_every=10 * steps,
    )
    pairs = ours(tok, rows, tokenize_params(SAFE_TEMPLATE, MAX_LENGTH, MAX_PROMPT_LENGTH))
    data = datasets.Dataset.from_dict(columns(pairs))
    policy = CompletionScorer(adapted(model_dir, lora))
    reference = (
        AdaptersOffReference(policy, CPU)
        if lora
        else ModelReference(freeze(CompletionScorer(load(model_dir))), CPU)
    )
    result = fit(
        policy,
        reference,
        data,
        params,
        CPU,
        pad_token_id(tok),
        tmp_path / "ckpt",
        "p",
        loss=objective("sigmoid", BETA),
    )
    # TRL sees our epochs' pair orders back to back, read sequentially, as one long epoch.
    order = np.concatenate(
        [epoch_plan(pair_lengths(data), params, e) for e in range(params.epochs)]
    )
    args = trl_config(
        tmp_path / "trl",
        learning_rate=lr,
        max_steps=steps,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        gradient_accumulation_steps=1,
        seed=3,
    )
    trainer = trl.DPOTrainer(
        model=adapted(model_dir, lora),
        ref_model=None if lora else load(model_dir),  # with adapters: TRL disables them
        args=args,
        train_dataset=pre_ordered(rows, order),
        processing_class=tok,
    )
    trainer.train()
    return result.log, [row for row in trainer.state.log_history if "loss" in row]


def adapted(model_dir: Path, lora: LoraParams | None) -> torch.nn.Module:
    """The demo model, with seeded LoRA adapters when `lora` is given (identical on both sides)."""
    model = load(model_dir)
    if lora is None:
        return model
    torch.manual_seed(11)
    return add_adapters(model, lora)


def max_diffs(mine: list[dict], theirs: list[dict]) -> tuple[float, float, float]:
    """Largest |loss| diff, relative grad-norm diff and |reward margin| diff over the steps."""
    pairs = list(zip(mine, theirs, strict=True))
    return (
        max(abs(a["loss"] - b["loss"]) for a, b in pairs),
        max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in pairs),
        max(abs(a["rewards/margins"] - b["rewards/margins"]) for a, b in pairs),
    )


@pytest.mark.slow
def test_twenty_steps_follow_trl(
    demo_model_dir: Path, tok: PreTrainedTokenizerBase, rows: list[dict], tmp_path: Path
) -> None:
    lr = 1e-3
    mine, theirs = trajectories(demo_model_dir, tok, rows, tmp_path, STEPS, lr)
    assert len(mine) == len(theirs) == STEPS
    loss_diff, norm_diff, margin_diff = max_diffs(mine, theirs)
    report("20-step loss trajectory, max |diff|", loss_diff)
    report("20-step grad norm, max relative diff", norm_diff)
    report("20-step reward margins, max |diff|", margin_diff)
    assert mine[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert mine[-1]["loss"] < 0.5 * math.log(2)  # it really trained
    assert loss_diff <= 1e-4 and norm_diff <= 1e-4 and margin_diff <= 1e-4

    # Win rate at step 1 (all rewards 0): a tie counts one half here, zero in TRL.
    assert mine[0]["rewards/accuracies"] == 0.5 and theirs[0]["rewards/accuracies"] == 0.0
    for a, b in zip(mine[1:], theirs[1:], strict=True):
        assert a["rewards/accuracies"] == pytest.approx(b["rewards/accuracies"])

    # Same linear decay; TRL logs the rate each step used, the pipeline the one after it.
    schedule = [lr * (1 - k / STEPS) for k in range(STEPS + 1)]
    assert [b["learning_rate"] for b in theirs] == pytest.approx(schedule[:-1])
    assert [a["lr"] for a in mine] == pytest.approx(schedule[1:])


@pytest.mark.slow
def test_ten_lora_steps_follow_trl_with_the_same_peft_adapters(
    demo_model_dir: Path, tok: PreTrainedTokenizerBase, rows: list[dict], tmp_path: Path
) -> None:
    lora = LoraParams(enabled=True, rank=8, alpha=16.0)
    mine, theirs = trajectories(demo_model_dir, tok, rows, tmp_path, 10, 5e-3, lora)
    assert len(mine) == len(theirs) == 10
    loss_diff, norm_diff, margin_diff = max_diffs(mine, theirs)
    report("10-step LoRA loss trajectory, max |diff|", loss_diff)
    report("10-step LoRA grad norm, max relative diff", norm_diff)
    assert mine[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start as a no-op
    assert mine[-1]["loss"] < math.log(2) - 0.01  # the adapters really trained
    assert loss_diff <= 1e-4 and norm_diff <= 1e-4 and margin_diff <= 1e-4
