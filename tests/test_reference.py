import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model import reference
from pipeline.model.batches import collate_pairs
from pipeline.model.loading import freeze
from pipeline.model.reference import CachedReference, ModelReference, StaleReference
from pipeline.model.scoring import CompletionScorer, score_pairs
from tests.helpers import CPU, fit, random_pairs, tiny_qwen3, train_params


def test_cached_values_equal_on_the_fly_values() -> None:
    data = random_pairs(10)
    model = freeze(CompletionScorer(tiny_qwen3()))
    chosen, rejected = score_pairs(model, data, 3, CPU, 0, "ref")  # the stage's batching
    cached = CachedReference(np.stack([chosen, rejected], 1), CPU.device)
    live = ModelReference(model, CPU)
    for rows in (np.array([7, 2, 9, 0]), np.array([5])):  # the trainer's batching differs
        batch = collate_pairs(data[rows.tolist()], 0)
        torch.testing.assert_close(cached(batch, rows), live(batch, rows), atol=1e-5, rtol=0)


def test_training_on_the_cache_matches_training_on_the_fly(tmp_path: Path) -> None:
    params = train_params(max_steps=3, seed=1, cached_reference=True, save_every=10)
    data = random_pairs(16)
    base = freeze(CompletionScorer(tiny_qwen3()))
    table = np.stack(score_pairs(base, data, 5, CPU, 0, "ref"), 1)
    runs = {}
    for name, ref in (
        ("cached", CachedReference(table, CPU.device)),
        ("live", ModelReference(base, CPU)),
    ):
        result = fit(
            CompletionScorer(tiny_qwen3()),
            ref,
            data,
            params,
            CPU,
            0,
            tmp_path / name,
            "key",
        )
        runs[name] = [row["loss"] for row in result.log]
    assert runs["cached"] == pytest.approx(runs["live"], abs=1e-5)


def test_stale_cache_is_refused(saved_model_and_pairs: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data_dir = saved_model_and_pairs
    identity = reference.describe(model_dir, data_dir, CPU, "none")
    reference.save(tmp_path / "cache", np.zeros((6, 2)), identity)
    assert reference.load(tmp_path / "cache", identity, 6).shape == (6, 2)
    # Another base model: same architecture, other weights.
    tiny_qwen3(seed=1).save_pretrained(model_dir)
    with pytest.raises(StaleReference, match="inputs"):
        reference.load(tmp_path / "cache", reference.describe(model_dir, data_dir, CPU, "none"), 6)
    # Other data.
    shutil.rmtree(data_dir)
    random_pairs(6, seed=5).save_to_disk(str(data_dir))
    with pytest.raises(StaleReference, match="inputs"):
        reference.load(tmp_path / "cache", reference.describe(model_dir, data_dir, CPU, "none"), 6)


def test_other_numeric_setting_or_size_is_refused(
    saved_model_and_pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, data_dir = saved_model_and_pairs
    identity = reference.describe(model_dir, data_dir, CPU, "none")
    reference.save(tmp_path / "cache", np.zeros((6, 2)), identity)
    bf16 = dataclasses.replace(CPU, autocast_dtype=torch.bfloat16)
    with pytest.raises(StaleReference, match="autocast"):
        reference.load(tmp_path / "cache", reference.describe(model_dir, data_dir, bf16, "none"), 6)
    with pytest.raises(StaleReference, match="6 cached pairs, the split has 7"):
        reference.load(tmp_path / "cache", identity, 7)
    with pytest.raises(FileNotFoundError, match="run the reference stage"):
        reference.load(tmp_path / "nothing", identity, 6)
