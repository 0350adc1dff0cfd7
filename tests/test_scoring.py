import torch

from pipeline.batching import collate_pairs
from pipeline.modeling import Runtime, batch_logps
from pipeline.scoring import CompletionScorer, token_logps
from tests.helpers import random_pairs, tiny_qwen3

CPU = Runtime(torch.device("cpu"), None)


def test_scorer_matches_full_logits_path_in_value_and_gradient() -> None:
    model = tiny_qwen3()
    batch = collate_pairs(random_pairs(4)[:], 0)
    full = batch_logps(model, batch, CPU)
    full.sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = batch_logps(CompletionScorer(model, chunk_tokens=5), batch, CPU)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_chunk_size_does_not_change_the_result() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(23, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (23,))
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (1, 7, 23, 100):
        torch.testing.assert_close(token_logps(hidden, weight, targets, chunk), expected)
    assert token_logps(hidden[:0], weight, targets[:0]).shape == (0,)


def test_only_completion_positions_reach_the_lm_head(monkeypatch) -> None:
    import pipeline.scoring as scoring

    rows_scored = []
    original = scoring.chunk_token_logps

    def counting(hidden, weight, targets):
        rows_scored.append(hidden.shape[0])
        return original(hidden, weight, targets)

    monkeypatch.setattr(scoring, "chunk_token_logps", counting)
    model = tiny_qwen3()
    batch = collate_pairs(random_pairs(2)[:], 0)
    hook = model.get_output_embeddings().register_forward_hook(
        lambda *_: (_ for _ in ()).throw(AssertionError("full logits were computed"))
    )
    with torch.no_grad():
        CompletionScorer(model)(batch.input_ids, batch.attention_mask, batch.completion_mask)
    hook.remove()
    assert sum(rows_scored) == int(batch.completion_mask[:, 1:].sum())
    assert sum(rows_scored) < int(batch.attention_mask.sum())  # prompts and padding skipped
