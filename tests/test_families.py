"""Every stage's model code on the decoder-only families transformers ships, not Qwen3 alone.

Each family is a tiny random-weight model built from its own config class, loaded as the
stages load one (`load_causal_lm`: SDPA where the family has it). The scorer must give the
plain full-logits log-probs (its mask fast path and logit rule are probed at load, never
chosen by the family's name), the first DPO step must cost exactly ln 2, a LoRA step must
train only the adapters, compiled layers must score like eager ones, and generation must stop
at the end token.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from pipeline.judge.generate import Answer, generate
from pipeline.judge.reward import load_reward_model, score_rows, train_reward_model
from pipeline.model.batches import collate_pairs
from pipeline.model.loading import decoder_layers, freeze, load_causal_lm
from pipeline.model.positions import check_positions, learned_positions
from pipeline.model.probes import UnsupportedModel
from pipeline.model.reference import ModelReference
from pipeline.model.scoring import CompletionScorer, batch_logps, check_architecture
from pipeline.params import AdapterParams, load_params
from pipeline.stage_io import StageError
from pipeline.train.adapters import AdaptersOffReference, add_adapters
from tests.helpers import CPU, REPO, compile_layers_aot_eager, fit, random_pairs, train_params
from tests.plain_dpo import full_logits_logps

VOCAB = 96
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# family -> (config class, its own settings). Beyond the families users name first, each of
# the rest takes a code path of its own: Gemma-2 soft-caps its logits and has no SDPA; Gemma-3
# mixes sliding and full attention layers; Phi adds a bias to its LM head; Cohere and Granite
# scale their logits; GPT-2 has Conv1D layers and its own names for everything.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "qwen2": ("Qwen2Config", {}),
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "phi3": ("Phi3Config", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 4}),
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 8, "sliding_window": 4, "sliding_window_pattern": 2},
    ),
    "olmo2": ("Olmo2Config", {}),
    "phi": ("PhiConfig", {}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0, "embedding_multiplier": 2.0}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}),
}


def config_of(family: str) -> transformers.PretrainedConfig:
    name, own = FAMILIES[family]
    if family == "gpt2":
        shape = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
        return transformers.GPT2Config(**shape, **own)
    return getattr(transformers, name)(**SHAPE, **own)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family saved once as a model folder with random weights."""
    folders = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        transformers.AutoModelForCausalLM.from_config(config_of(family)).save_pretrained(folder)
        folders[family] = folder
    return folders


def loaded(saved: dict[str, Path], family: str) -> transformers.PreTrainedModel:
    return load_causal_lm(saved[family], CPU, trust_remote_code=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_scorer_gives_the_full_logits_log_probs_in_value_and_gradient(saved, family) -> None:
    model = loaded(saved, family).eval()  # GPT-2's dropout would draw twice otherwise
    batch = collate_pairs(random_pairs(3)[:], 0)
    expected = full_logits_logps(model, batch)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = batch_logps(CompletionScorer(model), batch, CPU)
    got.sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        param = dict(model.named_parameters())[name]
        torch.testing.assert_close(param.grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_mask_fast_path_is_probed_not_named(saved) -> None:
    """Qwen3's decoder takes the prepared-mask mapping; Llama's refuses it and gets no mask.
    The same Qwen3 under eager attention, which would read the mapping as 'attend to all', is
    never given it."""
    assert CompletionScorer(loaded(saved, "qwen3")).masks == {"full_attention": None}
    assert CompletionScorer(loaded(saved, "llama")).masks is None
    eager = transformers.AutoModelForCausalLM.from_pretrained(
        saved["qwen3"], attn_implementation="eager"
    )
    assert CompletionScorer(eager).masks is None


def test_a_logit_transform_the_scorer_does_not_know_is_refused(saved) -> None:
    model = loaded(saved, "llama")
    head = model.get_output_embeddings()
    original = head.forward
    head.forward = lambda hidden: original(hidden) * 3.0  # a family scaling its logits unannounced
    with pytest.raises(UnsupportedModel, match=r"LlamaForCausalLM \(model_type llama\)"):
        CompletionScorer(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_download_model_checks_the_architecture_without_its_weights(family) -> None:
    check_architecture(config_of(family), trust_remote_code=False)  # raises if unsupported


@pytest.mark.parametrize("family", FAMILIES)
def test_the_first_step_costs_ln2(saved, family, tmp_path: Path) -> None:
    policy = CompletionScorer(loaded(saved, family))
    reference = freeze(CompletionScorer(loaded(saved, family)))
    params = train_params(max_steps=1)
    recipe = fit(
        policy,
        ModelReference(reference, CPU),
        random_pairs(8),
        params,
        CPU,
        0,
        tmp_path / "ckpt",
        "key",
    )
    assert recipe.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_lora_step_trains_the_adapters_alone(saved, family, tmp_path: Path) -> None:
    base = loaded(saved, family)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    lora = AdapterParams(enabled=True, rank=4, alpha=8, target_modules="all-linear")
    policy = CompletionScorer(add_adapters(base, lora))
    params = dataclasses.replace(train_params(max_steps=1), cached_reference=False)
    fit(
        policy,
        AdaptersOffReference(policy, CPU),
        random_pairs(8),
        params,
        CPU,
        0,
        tmp_path / "ckpt",
        "key",
    )
    after = dict(policy.model.get_base_model().named_parameters())
    adapters = {n: p for n, p in after.items() if "lora_B" in n}
    assert adapters and any(p.abs().sum() > 0 for p in adapters.values())  # B starts at zero
    frozen = {n.replace(".base_layer", ""): p for n, p in after.items() if "lora_" not in n}
    assert frozen.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(frozen[name], value), name


@pytest.mark.slow  # dynamo traces every family's layers: tens of seconds each on 2 cores
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_layers_score_like_eager_ones(saved, family) -> None:
    model = loaded(saved, family)
    batch = collate_pairs(random_pairs(3)[:], 0)
    with torch.no_grad():
        eager = batch_logps(CompletionScorer(model), batch, CPU)
    scorer = CompletionScorer(model)
    assert compile_layers_aot_eager(scorer.model) == len(decoder_layers(model)) > 0
    with torch.no_grad():
        torch.testing.assert_close(batch_logps(scorer, batch, CPU), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_at_the_end_token(saved, family) -> None:
    """Greedy answers, then the same with the fourth token of the first answer made the end
    token: that answer stops right before it, marked finished."""
    model = freeze(loaded(saved, family))
    params = load_params(REPO / "params.yaml")
    judge = dataclasses.replace(params.judge, temperature=0.0, max_new_tokens=8, samples=1)
    params = dataclasses.replace(params, judge=judge)
    prompts = [[5, 9, 14, 3, 7], [8, 4, 6]]  # left-padded to one batch
    full = [a[0].tokens for a in generate(model, prompts, params, 0, CPU, "test")]
    end = full[0][3]
    stopping = copy.deepcopy(model)
    stopping.generation_config.eos_token_id = [end]
    cut = generate(stopping, prompts, params, 0, CPU, "test")[0][0]
    assert cut == Answer(full[0][: full[0].index(end)], hit_max=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reward_head_loads_trains_and_reloads(saved, family, tmp_path: Path) -> None:
    """The reward model from the family's causal LM folder (transformers' own classifier, or
    the generic head on its backbone where it has none): a few Bradley-Terry steps move the
    scores, and the saved model scores as it did."""
    torch.manual_seed(0)
    model = load_reward_model(saved[family], CPU, trust_remote_code=False, pad_id=0)
    rows = [[5, 9, 14, 3, 7], [8, 4, 6], [11, 12, 13, 14], [3, 3]]
    pairs = [(rows[0], rows[1]), (rows[2], rows[3])]
    before = score_rows(model, rows, 4, CPU)
    params = dataclasses.replace(load_params(REPO / "params.yaml").judge, epochs=2, batch_size=1)
    train_reward_model(model, pairs, params, CPU)
    after = score_rows(model, rows, 4, CPU)
    assert not np.allclose(after, before)
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = load_reward_model(tmp_path, CPU, trust_remote_code=False, pad_id=0)
    np.testing.assert_allclose(score_rows(again, rows, 4, CPU), after, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_a_learned_position_table_limits_the_lengths(family) -> None:
    config = config_of(family)
    limit = learned_positions(config, trust_remote_code=False)
    assert limit == (config.n_positions if family == "gpt2" else None)
    check_positions(config, {"tokenize.max_length": 10_000} if limit is None else {}, False)


def test_lengths_past_the_position_table_are_refused_naming_the_keys() -> None:
    config = transformers.GPT2Config(n_positions=128, n_embd=32, n_layer=1, n_head=4)
    check_positions(config, {"tokenize.max_length": 128}, trust_remote_code=False)
    with pytest.raises(StageError) as refused:
        check_positions(config, {"tokenize.max_length": 192, "judge.max_length": 64}, False)
    said = str(refused.value)
    assert "tokenize.max_length = 192" in said and "at most 128 tokens" in said
    assert "judge.max_length" not in said
