import pytest
import torch

from pipeline.model.batches import collate_pairs
from pipeline.model.scoring import CompletionScorer, batch_logps, token_logps
from tests.helpers import CPU, random_pairs, tiny_qwen3
from tests.plain_dpo import full_logits_logps


def assert_same_value_and_gradient(model, expected_scorer, scorer, batch) -> None:
    """Both scorers of `model` give the same log-probs and parameter gradients to 1e-5;
    `expected_scorer` is `model` itself for the plain full-logits reference."""
    if expected_scorer is model:
        expected = full_logits_logps(model, batch)
    else:
        expected = batch_logps(expected_scorer, batch, CPU)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = batch_logps(scorer, batch, CPU)
    got.sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk_tokens", [5, None])  # recomputed chunks; one kept chunk
def test_scorer_matches_full_logits_path_in_value_and_gradient(chunk_tokens) -> None:
    model = tiny_qwen3()
    batch = collate_pairs(random_pairs(4)[:], 0)
    scorer = CompletionScorer(model, chunk_tokens=chunk_tokens)
    assert_same_value_and_gradient(model, model, scorer, batch)  # the plain model: full logits


def test_chunk_size_does_not_change_the_result() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(23, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (23,))
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (1, 7, 23, 100):
        torch.testing.assert_close(token_logps(hidden, weight, targets, chunk), expected)
    assert token_logps(hidden[:0], weight, targets[:0]).shape == (0,)


def test_only_completion_positions_reach_the_lm_head(monkeypatch) -> None:
    import pipeline.model.scoring as scoring

    rows_scored = []
    original = scoring.chunk_token_logps

    def counting(hidden, *args):
        rows_scored.append(hidden.shape[0])
        return original(hidden, *args)

    model = tiny_qwen3()
    scorer = CompletionScorer(model)  # its load-time check computes full logits once
    monkeypatch.setattr(scoring, "chunk_token_logps", counting)
    batch = collate_pairs(random_pairs(2)[:], 0)
    hook = model.get_output_embeddings().register_forward_hook(
        lambda *_: (_ for _ in ()).throw(AssertionError("full logits were computed"))
    )
    with torch.no_grad():
        scorer(batch.input_ids, batch.attention_mask, batch.completion_mask)
    hook.remove()
    assert sum(rows_scored) == int(batch.completion_mask[:, 1:].sum())
    assert sum(rows_scored) < int(batch.attention_mask.sum())  # prompts and padding skipped


def test_pack_rows_restarts_positions_per_row() -> None:
    from pipeline.model.scoring import pack_rows

    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    attention = (ids != 0).long()
    completion = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]])
    packed_ids, positions, rows, flags = pack_rows(ids, attention, completion)
    assert packed_ids.tolist() == [5, 6, 7, 8, 9, 1, 2, 3, 4]
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert flags.tolist() == [False, True, True, False, True, False, False, True, True]


def test_packed_rows_score_like_padded_rows_in_value_and_gradient() -> None:
    # On CPU transformers keeps attention inside each packed row with a block-diagonal mask built
    # from the restarting position ids; on CUDA flash-attention's varlen kernel does the same.
    model = tiny_qwen3()
    data = random_pairs(6)[:]
    data["prompt_input_ids"][1] = []  # an empty prompt: its first answer token is not scored
    batch = collate_pairs(data, 0)
    packed = CompletionScorer(model, packed=True)
    assert_same_value_and_gradient(model, CompletionScorer(model), packed, batch)


def test_chunks_are_sized_by_the_vocabulary() -> None:
    from pipeline.model.scoring import chunk_tokens_for

    assert chunk_tokens_for(151_936) == 256  # Qwen3: 156 MB of fp32 logits per chunk
    assert chunk_tokens_for(2048) == 256 * 151_936 // 2048
    assert chunk_tokens_for(10**12) == 1
