"""The reward stage as a user runs it: `python -m stages.reward` in a working directory holding
params.yaml, dvc.yaml, models/base (the demo's tiny Qwen3) and data/subsampled/eval (held-out
pairs in the subsample stage's schema), offline, with small judge settings. A success writes
models/reward, reports/reward.json and metrics/reward.json; an expected failure is one `error:`
line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from demo.dataset import SOURCE_SCHEMA
from pipeline.data.schema import SUBSAMPLED_SCHEMA
from pipeline.judge.build import HEADLINE
from pipeline.judge.trust import COIN, wilson_interval
from tests.helpers import REPO, read_pairs, with_ids

pytestmark = pytest.mark.slow  # seven runs of the stage, each in a fresh process: ~80 s in all

HELD_OUT_QUESTIONS = 8  # whole questions of the demo's data/evaluation: a few dozen pairs
PLANTED_QUESTIONS = 2  # of them, also put into the reward folder
REWARD_PAIRS = 40  # reward-folder pairs of questions that are not held out

# Small, fast judge settings: every test starts from these.
SMALL_JUDGE = {
    "fraction": 1.0,
    "max_length": 128,
    "batch_size": 8,
    "epochs": 1,
    "device": "cpu",
    "lr": 1e-4,
}


def read_folder(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet")))


def write_shards(folder: Path, table: pa.Table, shards: int = 1) -> None:
    """`table` (stack-exchange-paired's schema) as hub-named parquet shards under `folder`."""
    folder.mkdir(parents=True)
    table = table.select(SOURCE_SCHEMA.names).cast(SOURCE_SCHEMA)
    size = -(-len(table) // shards)
    for i in range(shards):
        part = table.slice(i * size, size)
        pq.write_table(part, folder / f"train-{i:05d}-of-{shards:05d}.parquet")


def assert_interval(report: dict, line: str) -> None:
    """The report's interval is the Wilson interval of its accuracy over its held-out pairs,
    and the stage's line warns exactly when the interval reaches a coin."""
    interval = (report["reward_accuracy_low"], report["reward_accuracy_high"])
    assert interval == wilson_interval(report["reward_accuracy"], report["heldout_pairs"])
    warned = line.endswith(
        "pairs; lower end at or below 0.5: the judge's figures will be marked unreliable"
    )
    assert warned == (interval[0] <= COIN), line


@pytest.fixture(scope="module")
def held_out(demo_dataset_dir: Path) -> pa.Table:
    """The first HELD_OUT_QUESTIONS questions (by URL) of the demo's data/evaluation, whole, in
    SUBSAMPLED_SCHEMA, as the subsample stage writes data/subsampled/eval/data.parquet."""
    evaluation = with_ids(read_pairs(demo_dataset_dir / "data" / "evaluation"))
    questions = sorted(set(evaluation["question_id"].to_pylist()))[:HELD_OUT_QUESTIONS]
    mask = pc.is_in(evaluation["question_id"], value_set=pa.array(questions, pa.string()))
    table = evaluation.filter(mask)
    assert 20 <= len(table) <= 60 and table.schema.equals(SUBSAMPLED_SCHEMA)
    return table


@pytest.fixture(scope="module")
def planted(held_out: pa.Table, demo_dataset_dir: Path) -> pa.Table:
    """Every pair of PLANTED_QUESTIONS held-out questions (stack-exchange-paired's schema)."""
    source = read_folder(demo_dataset_dir / "data" / "evaluation")
    questions = sorted(set(held_out["question_id"].to_pylist()))[:PLANTED_QUESTIONS]
    urls = pa.array([m[0] for m in source["metadata"].to_pylist()], pa.string())
    table = source.filter(pc.is_in(urls, value_set=pa.array(questions, pa.string())))
    assert len(table) >= PLANTED_QUESTIONS
    return table


@pytest.fixture(scope="module")
def reward_dataset(
    tmp_path_factory: pytest.TempPathFactory,
    demo_dataset_dir: Path,
    held_out: pa.Table,
    planted: pa.Table,
) -> Path:
    """A dataset folder in the hub layout whose data/reward holds REWARD_PAIRS pairs of the
    demo's reward questions that are not held out, plus the planted held-out pairs (two shards)."""
    reward = read_folder(demo_dataset_dir / "data" / "reward")
    urls = pa.array([m[0] for m in reward["metadata"].to_pylist()], pa.string())
    held = held_out["question_id"].unique()
    others = reward.filter(pc.invert(pc.is_in(urls, value_set=held)))
    rows = pa.concat_tables([others.slice(0, REWARD_PAIRS).select(SOURCE_SCHEMA.names), planted])
    root = tmp_path_factory.mktemp("reward-dataset")
    write_shards(root / "data" / "reward", rows.take(pa.array(_interleaved(len(rows)))), shards=2)
    return root


def _interleaved(n: int) -> list[int]:
    """A fixed shuffle (planted rows spread over both shards)."""
    return sorted(range(n), key=lambda i: (i * 7919) % n)


@pytest.fixture(scope="module")
def other_reward_model(tmp_path_factory: pytest.TempPathFactory, demo_dataset_dir: Path) -> Path:
    """An existing reward model of another family than the policy: its own smaller tokenizer
    (with a chat template) and a tiny Qwen3ForSequenceClassification with one output."""
    import torch
    from transformers import Qwen3ForSequenceClassification

    from demo.dataset import sample_texts
    from demo.model import TinyShape, tiny_config
    from demo.tokenizer import train_tokenizer

    texts = [text for _, text in zip(range(400), sample_texts(demo_dataset_dir), strict=False)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    assert tokenizer.chat_template is not None
    shape = TinyShape(vocab_size=400, hidden_size=32, num_layers=1, intermediate_size=64)
    config = tiny_config(tokenizer, shape)
    config.num_labels = 1
    assert config.pad_token_id is not None
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("other-reward-model")
    Qwen3ForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def make_workdir(work: Path, base_model: Path, held_out: pa.Table) -> Path:
    """A working directory as the reward stage finds it after download_model and subsample."""
    shutil.copytree(base_model, work / "models" / "base")
    (work / "data" / "subsampled" / "eval").mkdir(parents=True)
    pq.write_table(held_out, work / "data" / "subsampled" / "eval" / "data.parquet")
    return work


@pytest.fixture
def workdir(tmp_path: Path, demo_model_dir: Path, held_out: pa.Table) -> Path:
    return make_workdir(tmp_path / "work", demo_model_dir, held_out)


def run_reward(workdir: Path, dataset: Path | str, **judge: object) -> subprocess.CompletedProcess:
    """`python -m stages.reward` in `workdir`, offline, with data.dataset = `dataset` and the
    judge section = SMALL_JUDGE updated by `judge`."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    settings["data"]["dataset"] = str(dataset)
    settings["judge"].update({**SMALL_JUDGE, **judge})
    (workdir / "params.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    shutil.copy(REPO / "dvc.yaml", workdir / "dvc.yaml")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(workdir.parent / "hf-home"),  # an empty hub cache: nothing to fall back on
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("DVC_ROOT", None)
    return subprocess.run(
        [sys.executable, "-m", "stages.reward"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error(done: subprocess.CompletedProcess, expected: str) -> None:
    """Exit 1, no traceback, and `expected` as the one `error:` line, last on stderr (progress
    bars of the work done before the failure may come first)."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [expected]
    assert lines[-1] == expected


def assert_nothing_written(workdir: Path) -> None:
    assert not (workdir / "models" / "reward").exists()
    assert not list((workdir / "models").glob(".reward*"))  # no half-written temporary folder
    assert not (workdir / "reports").exists() and not (workdir / "metrics").exists()


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.strip().splitlines()[-1]


def test_a_bad_judge_param_is_one_line_before_any_work(tmp_path: Path) -> None:
    """An empty working directory: the params are checked before anything is read."""
    work = tmp_path / "work"
    done = run_reward(work, tmp_path / "no-dataset", prompts=0)
    assert_one_error(done, "error: judge.prompts must be > 0, got 0")
    assert sorted(p.name for p in work.iterdir()) == ["dvc.yaml", "params.yaml"]


def test_a_dataset_without_reward_pairs_names_the_key_and_the_ways_out(
    tmp_path: Path, workdir: Path, demo_dataset_dir: Path
) -> None:
    dataset = tmp_path / "no-reward"
    for folder in ("rl", "evaluation"):  # the DPO folders only
        shutil.copytree(demo_dataset_dir / "data" / folder, dataset / "data" / folder)
    done = run_reward(workdir, dataset)
    assert_one_error(
        done,
        f"error: judge.reward_dir: no reward pairs in {dataset}/data/reward (no split "
        f"'data/reward' in {dataset}: looked for data/reward/*, data/data/reward-*, "
        "data/reward-* and data/reward.* as .parquet, .jsonl, .json, .csv, .jsonl.gz, .json.gz, "
        ".csv.gz); set "
        'judge.reward_dir to the split that holds them ("": the train pairs the policy does not '
        "use), or judge.model to an existing reward model (a hub id or local folder)",
    )
    assert_nothing_written(workdir)


def test_a_reward_folder_of_identical_answers_has_no_usable_pair(
    tmp_path: Path, workdir: Path, reward_dataset: Path, held_out: pa.Table
) -> None:
    rows = read_folder(reward_dataset / "data" / "reward")
    urls = pa.array([m[0] for m in rows["metadata"].to_pylist()], pa.string())
    held = held_out["question_id"].unique()
    rows = rows.filter(pc.invert(pc.is_in(urls, value_set=held))).slice(0, 12)
    same = rows.set_column(
        rows.schema.get_field_index("response_k"), "response_k", rows["response_j"]
    )
    dataset = tmp_path / "identical"
    write_shards(dataset / "data" / "reward", same)
    done = run_reward(workdir, dataset)
    assert_one_error(
        done,
        f"error: judge.reward_dir: no usable pair in {dataset}/data/reward (12 pairs after "
        "removing 0 of held-out questions, all with identical or empty answers)",
    )
    assert_nothing_written(workdir)


def test_held_out_questions_are_removed_before_training(
    workdir: Path, reward_dataset: Path, planted: pa.Table, held_out: pa.Table
) -> None:
    done = run_reward(workdir, reward_dataset)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    report = json.loads((workdir / "reports" / "reward.json").read_text())
    fetched = REWARD_PAIRS + len(planted)
    assert report["rows_fetched"] == fetched
    assert report["held_out_questions_removed"] == len(planted)
    assert report["train_pairs"] == REWARD_PAIRS  # every kept demo pair has distinct answers
    assert report["heldout_pairs"] == len(held_out)
    assert [row["epoch"] for row in report["history"]] == [1]
    assert last_line(done).startswith(
        f"reward model ({REWARD_PAIRS} pairs of data/reward): held-out pair accuracy "
        f"{report['reward_accuracy']:.4f} [{report['reward_accuracy_low']:.4f}, "
        f"{report['reward_accuracy_high']:.4f}] on {len(held_out)} pairs"
    )
    assert_interval(report, last_line(done))

    model = workdir / "models" / "reward"
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert len(config["id2label"]) == 1  # num_labels 1, as transformers saves it
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    form = json.loads((model / "reward_format.json").read_text())
    assert form["chat"] is False and form["max_length"] == 128
    assert form["tokenize"]["max_prompt_length"] <= 64  # half of judge.max_length at most
    resolved = json.loads((model / "resolved_params.json").read_text())
    assert resolved["judge"]["fraction"] == 1.0 and resolved["judge"]["model"] == ""
    metrics = json.loads((workdir / "metrics" / "reward.json").read_text())
    assert metrics == {k: report[k] for k in HEADLINE}
    assert 0 <= metrics["reward_accuracy"] <= 1


def test_a_lora_reward_model_is_saved_merged_and_scores_as_measured(
    workdir: Path, reward_dataset: Path, demo_model_dir: Path, held_out: pa.Table
) -> None:
    """judge.lora: adapters on the backbone while training, merged into a plain model on disk
    (no peft keys): weights outside the adapted modules are the base's, the adapted ones moved,
    and the saved model, loaded as the judge loads it, gives the recorded held-out accuracy."""
    import torch
    from safetensors.torch import load_file

    from pipeline.judge.reward import open_reward_model, pair_accuracy, pair_rows
    from pipeline.model.loading import resolve_runtime

    lora = {
        "enabled": True,
        "rank": 4,
        "alpha": 8,
        "dropout": 0.0,
        "target_modules": "q_proj,v_proj",
    }
    done = run_reward(workdir, reward_dataset, lora=lora, lr=1e-3)
    assert done.returncode == 0, done.stderr
    saved = load_file(workdir / "models" / "reward" / "model.safetensors")
    base = load_file(demo_model_dir / "model.safetensors")  # tied embeddings: no lm_head
    assert set(saved) == set(base) | {"score.weight"}  # a plain model: no lora_ / base_model keys
    moved = {k for k, v in base.items() if not torch.equal(v, saved[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), moved

    report = json.loads((workdir / "reports" / "reward.json").read_text())
    runtime = resolve_runtime("cpu")
    reloaded, tokenizer, form = open_reward_model(workdir / "models" / "reward", runtime, False)
    pairs = pair_rows(held_out, tokenizer, form)
    accuracy = pair_accuracy(reloaded, pairs, SMALL_JUDGE["batch_size"], runtime)
    assert accuracy == report["reward_accuracy"]


@pytest.fixture(scope="module")
def adopted(
    tmp_path_factory: pytest.TempPathFactory,
    demo_model_dir: Path,
    held_out: pa.Table,
    reward_dataset: Path,
    other_reward_model: Path,
) -> tuple[Path, subprocess.CompletedProcess]:
    """One run of the stage with judge.model = other_reward_model: (workdir, process)."""
    work = make_workdir(tmp_path_factory.mktemp("adopt") / "work", demo_model_dir, held_out)
    return work, run_reward(work, reward_dataset, model=str(other_reward_model))


def test_an_existing_reward_model_with_its_own_tokenizer_is_adopted(
    adopted: tuple[Path, subprocess.CompletedProcess],
    other_reward_model: Path,
    held_out: pa.Table,
) -> None:
    workdir, done = adopted
    name = str(other_reward_model)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        f"reward: {name}'s tokenizer is not the policy's; the judge hands it answers as text "
        "and it reads them with its own tokenizer"
    ) in done.stdout.splitlines()

    report = json.loads((workdir / "reports" / "reward.json").read_text())
    assert report["model"] == name
    assert 0 < report["heldout_pairs"] <= len(held_out)
    assert "history" not in report and "train_pairs" not in report  # nothing trained
    assert 0 <= report["reward_accuracy"] <= 1
    assert last_line(done).startswith(
        f"reward model ({name}): held-out pair accuracy {report['reward_accuracy']:.4f} "
        f"[{report['reward_accuracy_low']:.4f}, {report['reward_accuracy_high']:.4f}] "
        f"on {report['heldout_pairs']} pairs"
    )
    assert_interval(report, last_line(done))
    model = workdir / "models" / "reward"
    form = json.loads((model / "reward_format.json").read_text())
    assert form["chat"] is True and form["max_length"] == 128
    # Adopted as it is: the weights are the given model's bytes, its own tokenizer beside them.
    assert (model / "model.safetensors").read_bytes() == (
        other_reward_model / "model.safetensors"
    ).read_bytes()
    vocab = [
        json.loads((f / "tokenizer.json").read_text())["model"]["vocab"]
        for f in (model, other_reward_model)
    ]
    assert vocab[0] == vocab[1] and len(vocab[0]) < 1000  # not the policy's 2,048 + 3
    assert json.loads((model / "resolved_params.json").read_text())["judge"]["model"] == name
    metrics = json.loads((workdir / "metrics" / "reward.json").read_text())
    assert metrics == {k: report[k] for k in HEADLINE}


def test_an_adopted_chat_reward_model_reads_every_held_out_pairs_answers(
    adopted: tuple[Path, subprocess.CompletedProcess], held_out: pa.Table
) -> None:
    """As for a reward model trained here, the prompt keeps at most half of judge.max_length,
    so every held-out pair (distinct answers) is measured."""
    workdir, done = adopted
    assert done.returncode == 0, done.stderr
    report = json.loads((workdir / "reports" / "reward.json").read_text())
    assert report["heldout_pairs"] == len(held_out)


def test_a_causal_lm_as_judge_model_is_not_a_reward_model(
    workdir: Path, reward_dataset: Path, demo_model_dir: Path
) -> None:
    name = str(demo_model_dir)
    done = run_reward(workdir, reward_dataset, model=name)
    assert_one_error(
        done,
        f"error: judge.model: {name!r} is not a reward model (a sequence-classification model "
        "with one output; it has 2 outputs, architectures ['Qwen3ForCausalLM']); set "
        'judge.model: "" to train one on judge.reward_dir',
    )
    assert_nothing_written(workdir)


def test_a_judge_model_folder_that_does_not_exist_is_named(
    tmp_path: Path, workdir: Path, reward_dataset: Path
) -> None:
    missing = tmp_path / "no" / "such-reward-model"
    done = run_reward(workdir, reward_dataset, model=str(missing))
    assert_one_error(done, f"error: judge.model: no folder at '{missing}' (and not a hub id)")
    assert_nothing_written(workdir)


def test_the_reward_model_trains_on_the_share_judge_fraction_asks_for(
    workdir: Path, reward_dataset: Path, planted: pa.Table
) -> None:
    """A fraction fetches whole shards (here one of two), but trains on its share of the rows."""
    rows = REWARD_PAIRS + len(planted)
    done = run_reward(workdir, reward_dataset, fraction=0.25)
    assert done.returncode == 0, done.stderr
    report = json.loads((workdir / "reports" / "reward.json").read_text())
    assert report["rows_fetched"] == rows // 2  # the first shard
    used = report["train_pairs"] + report["held_out_questions_removed"]
    assert 0 < used <= math.ceil(0.25 * rows) < report["rows_fetched"]
