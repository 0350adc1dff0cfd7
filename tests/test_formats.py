"""Preference formats: told from the columns, every form of the same pairs giving the same token
ids, split layouts, bad rows named and counted, conversations through the chat template."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest

from pipeline.data.formats import FormatError, detect
from pipeline.data.prompts import encode_prompts, render_prompt
from pipeline.data.schema import load_tokenized, read_split
from pipeline.data.subsample import subsample
from pipeline.data.tokenization import tokenize_split
from pipeline.download.data import fetch_data
from pipeline.params import ColumnsParams, DataParams, load_params
from pipeline.stage_io import StageError
from tests.helpers import NO_COLUMNS, REPO

SYSTEM = "You answer in one line."


def base_pairs(n: int, start: int = 0) -> list[dict]:
    """(question, chosen, rejected) texts, two pairs per question."""
    return [
        {
            "question": f"How do I sort list number {q}?",
            "chosen": f"Use sorted(): answer {p} to {q}.",
            "rejected": f"No idea ({p}, {q}).",
        }
        for q in range(start, start + n)
        for p in range(2)
    ]


def turns(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def as_form(form: str, pairs: list[dict]) -> list[dict]:
    """The same pairs in one of the known forms."""
    if form == "trl_standard":
        return [
            {"prompt": p["question"], "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in pairs
        ]
    if form == "trl_conversational_implicit":
        return [
            {
                "chosen": turns(p["question"], p["chosen"]),
                "rejected": turns(p["question"], p["rejected"]),
            }
            for p in pairs
        ]
    if form == "ultrafeedback":
        return [
            {
                "prompt": p["question"],
                "prompt_id": f"id-{p['question']}",
                "chosen": turns(p["question"], p["chosen"]),
                "rejected": turns(p["question"], p["rejected"]),
                "messages": turns(p["question"], p["chosen"]),
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
            for p in pairs
        ]
    if form == "hh":
        transcript = "\n\nHuman: {q}\n\nAssistant: {a}"
        return [
            {
                "chosen": transcript.format(q=p["question"], a=p["chosen"]),
                "rejected": transcript.format(q=p["question"], a=p["rejected"]),
            }
            for p in pairs
        ]
    if form == "orca":
        return [{"system": "", **p} for p in pairs]
    raise ValueError(form)


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        write(path.with_suffix(""), rows)
        with open(path.with_suffix(""), "rb") as plain, gzip.open(path, "wb") as packed:
            packed.write(plain.read())
        path.with_suffix("").unlink()
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pa.csv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


# Each Done-when form: where its splits live and the columns it needs named.
HUB_FILE = "data/{split}-00000-of-00001.parquet"
FORMS = {
    "trl_standard": ("{split}.jsonl", ("train", "test"), NO_COLUMNS),
    "trl_conversational_implicit": (HUB_FILE, ("train", "test"), NO_COLUMNS),
    "ultrafeedback": (HUB_FILE, ("train_prefs", "test_prefs"), NO_COLUMNS),
    "hh": ("{split}.jsonl", ("train", "test"), NO_COLUMNS),
    "orca": ("{split}.jsonl", ("train", "test"), ColumnsParams("question", "", "", "", "")),
}


def dataset(root: Path, form: str) -> tuple[Path, DataParams]:
    layout, (train, test), columns = FORMS[form]
    write(root / layout.format(split=train), as_form(form, base_pairs(6)))
    write(root / layout.format(split=test), as_form(form, base_pairs(3, start=100)))
    data = dataclasses.replace(
        load_params(REPO / "params.yaml").data,
        dataset=str(root),
        train_dir=train,
        eval_dir=test,
        columns=columns,
        fraction=1.0,
        eval_size=6,
    )
    return root, data


def tokenized(tmp_path: Path, data: DataParams, tokenizer, chat: bool) -> dict[str, list[tuple]]:
    """fetch, subsample, tokenize -> per split, the sorted (prompt, chosen, rejected) ids."""
    manifests = fetch_data(data, tmp_path / "raw")
    rows = manifests["train"]["source_rows"]
    subsample(tmp_path / "raw", tmp_path / "sub", 1.0, rows, data.eval_size, data.seed)
    params = dataclasses.replace(load_params(REPO / "params.yaml").tokenize, use_chat_template=chat)
    out = {}
    for split in ("train", "eval"):
        tokenize_split(
            tmp_path / "sub" / split / "data.parquet", tmp_path / "tok" / split, tokenizer, params
        )
        table = load_tokenized(tmp_path / "tok" / split)
        names = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
        out[split] = sorted(zip(*(table[n] for n in names), strict=True))
    return out


@pytest.mark.parametrize("chat", [False, True])
def test_every_form_of_the_same_pairs_gives_the_same_token_ids(
    tmp_path: Path, demo_tokenizer, chat: bool
) -> None:
    tok = demo_tokenizer
    got = {
        form: tokenized(tmp_path / form, dataset(tmp_path / form / "set", form)[1], tok, chat)
        for form in FORMS
    }
    first = got["trl_standard"]
    assert len(first["train"]) == 12 and len(first["eval"]) == 6
    for form, splits in got.items():
        assert splits == first, form


def test_the_forms_are_told_from_their_columns() -> None:
    names = {
        "stack-exchange-paired": [
            "qid",
            "question",
            "date",
            "metadata",
            "response_j",
            "response_k",
        ],
        "explicit prompt": [
            "prompt",
            "chosen",
            "rejected",
            "prompt_id",
            "messages",
            "score_chosen",
        ],
        "implicit prompt": ["chosen", "rejected"],
    }
    for name, columns in names.items():
        assert detect(columns, NO_COLUMNS).name == name
    mapped = detect(
        ["system", "question", "chosen", "rejected"], ColumnsParams("question", "", "", "", "")
    )
    assert (mapped.prompt, mapped.system) == ("question", "system")


def test_an_undetectable_format_names_the_columns_and_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(FormatError) as error:
        detect(["instruction", "good", "bad"], NO_COLUMNS)
    message = str(error.value)
    assert "columns ['instruction', 'good', 'bad']" in message
    assert "stack-exchange-paired" in message and "data.columns" in message
    with pytest.raises(FormatError, match=r"data.columns.prompt: no column 'query'"):
        detect(["question", "chosen", "rejected"], ColumnsParams("query", "", "", "", ""))


def test_the_stage_fails_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    from tests.test_stage_errors import run_stage

    root = tmp_path / "set"
    write(root / "train.jsonl", [{"instruction": "Q", "good": "A", "bad": "B"}])
    write(root / "test.jsonl", [{"instruction": "Q", "good": "A", "bad": "B"}])
    work = tmp_path / "work"
    work.mkdir()
    done = run_stage(
        "download_data", work, data={"dataset": str(root), "train_dir": "train", "eval_dir": "test"}
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: {root}/train.jsonl: cannot tell the preference format of columns"
    )
    assert not list((work / "data").iterdir())  # no data/raw, no temporary folder


def test_bad_rows_are_named_by_split_and_row_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = as_form("trl_conversational_implicit", base_pairs(2))
    bad = [
        {"chosen": turns("Q", "A")[:1], "rejected": turns("Q", "B")[:1]},  # no assistant answer
        {"chosen": turns("Q", "A"), "rejected": turns("Other Q", "B")},  # other prompts
        {"chosen": [{"role": "robot", "content": "A"}], "rejected": turns("Q", "B")},
    ]
    root, data = dataset(tmp_path / "set", "trl_conversational_implicit")
    write(root / "data/train-00000-of-00001.parquet", good[:1] + bad + good[1:])
    manifests = fetch_data(data, tmp_path / "raw")
    assert manifests["train"]["rows_fetched"] == len(good)
    assert manifests["train"]["dropped"] == {
        "a conversation that does not end with an assistant turn": 1,
        "chosen and rejected differ before their last turn": 1,
        "chosen holds a message with role 'robot' or non-text content": 1,
    }
    lines = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines()]
    assert (
        "train row 1 (train-00000-of-00001.parquet row 1) dropped: a conversation that "
        "does not end with an assistant turn" in lines
    )
    assert (
        "train row 3 (train-00000-of-00001.parquet row 3) dropped: chosen holds a message "
        "with role 'robot' or non-text content" in lines
    )


@pytest.mark.parametrize(
    ("layout", "prefix"),
    [
        ("{split}/part-0.parquet", ""),
        ("data/{split}-00000-of-00002.parquet", ""),
        ("{split}.jsonl", ""),
        ("{split}.json", ""),
        ("{split}.csv", ""),
        ("{split}.parquet", ""),
        ("{split}.json.gz", ""),
        ("harmless-base/{split}.jsonl.gz", "harmless-base/"),
    ],
)
def test_splits_are_found_in_the_hub_layouts(tmp_path: Path, layout: str, prefix: str) -> None:
    """`prefix`: a split in a folder of several (hh-rlhf's harmless-base/train.jsonl.gz)."""
    root = tmp_path / "set"
    for split, start in (("train", 0), ("test", 100)):
        write(root / layout.format(split=split), as_form("trl_standard", base_pairs(3, start)))
    data = dataclasses.replace(
        load_params(REPO / "params.yaml").data,
        dataset=str(root),
        train_dir=f"{prefix}train",
        eval_dir=f"{prefix}test",
        fraction=1.0,
        eval_size=2,
    )
    manifests = fetch_data(data, tmp_path / "raw")
    assert manifests["train"]["rows_fetched"] == 6 and manifests["eval"]["rows_fetched"] == 6
    assert (
        read_split(tmp_path / "raw" / "eval")["question"][0].as_py()
        == "How do I sort list number 100?"
    )


def test_without_an_eval_split_the_held_out_questions_come_out_of_train(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write(root / "train.jsonl", as_form("trl_standard", base_pairs(20)))
    data = dataclasses.replace(
        load_params(REPO / "params.yaml").data,
        dataset=str(root),
        train_dir="train",
        eval_dir="",
        fraction=1.0,
        eval_size=8,
    )
    manifests = fetch_data(data, tmp_path / "raw")
    counts = subsample(
        tmp_path / "raw", tmp_path / "sub", 1.0, manifests["train"]["source_rows"], 8, 0
    )
    train = pq.read_table(tmp_path / "sub/train/data.parquet")
    held = pq.read_table(tmp_path / "sub/eval/data.parquet")
    assert counts["eval"] == 8 and counts["train"] == 32  # whole questions of 2 pairs
    assert not set(train["question_id"].to_pylist()) & set(held["question_id"].to_pylist())


# --- conversations ----------------------------------------------------------------------------


def test_a_conversation_needs_the_chat_template(demo_tokenizer) -> None:
    params = load_params(REPO / "params.yaml").tokenize
    context = [{"role": "system", "content": SYSTEM}]
    with pytest.raises(
        StageError, match="tokenize.use_chat_template: the data holds conversations"
    ):
        render_prompt(demo_tokenizer, "Q?", params, context)


@pytest.mark.slow
def test_a_conversation_is_the_chat_templates_rendering(qwen3_tokenizer) -> None:
    params = dataclasses.replace(load_params(REPO / "params.yaml").tokenize, use_chat_template=True)
    context = [{"role": "system", "content": SYSTEM}, *turns("Hi", "Hello!")]
    ((ids, cut),) = encode_prompts(qwen3_tokenizer, ["And now?"], params, [context])
    expected = qwen3_tokenizer.apply_chat_template(
        [*context, {"role": "user", "content": "And now?"}],
        add_generation_prompt=True,
        enable_thinking=False,
        tokenize=False,
    )
    assert qwen3_tokenizer.decode(ids) == expected and not cut


def test_a_long_conversation_keeps_its_latest_turns_and_its_system_turn(qwen3_tokenizer) -> None:
    params = dataclasses.replace(
        load_params(REPO / "params.yaml").tokenize, use_chat_template=True, max_prompt_length=80
    )
    old = [*turns("first " * 30, "reply " * 30), *turns("second question", "second reply")]
    context = [{"role": "system", "content": SYSTEM}, *old]
    ((ids, cut),) = encode_prompts(qwen3_tokenizer, ["last question"], params, [context])
    text = qwen3_tokenizer.decode(ids)
    assert cut and len(ids) <= 80
    assert SYSTEM in text and "second question" in text and "last question" in text
    assert "first" not in text and "reply reply" not in text
    whole = render_prompt(qwen3_tokenizer, "last question", params, [context[0], *old[2:]])
    assert text == whole  # whole turns dropped, nothing cut inside one


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_orca_shaped_folder_trains_and_evaluates_as_a_dvc_experiment(
    e2e_repo, tmp_path: Path
) -> None:
    """`dvc exp run` (through the demo wrapper, on the demo's tiny model) on a local folder with a
    system column and other column names, rendered with the chat template: train and evaluate
    run on it, and the demo's extra held-out set is scored too."""
    import sys

    from tests.e2e import run
    from tests.test_real_route import exp_file

    root = tmp_path / "orca"
    for split, pairs in (("train", base_pairs(40)), ("test", base_pairs(10, start=100))):
        rows = [{"system": SYSTEM if i % 2 else "", **p} for i, p in enumerate(pairs)]
        write(root / f"{split}.jsonl", rows)
    repo, env = e2e_repo("orca")
    keys = {
        "data.dataset": root,
        "data.train_dir": "train",
        "data.eval_dir": "test",
        "data.columns.prompt": "question",
        "tokenize.use_chat_template": "true",
    }
    flags = [arg for key, value in keys.items() for arg in ("-S", f"{key}={value}")]
    said = run(repo, env, sys.executable, "-m", "demo", *flags, "--name", "orca", "evaluate")
    assert "Running stage 'train'" in said and "Running stage 'judge'" not in said, said[-3000:]
    assert "train: 80 pairs (data.columns)" in said and "eval: 20 pairs (data.columns)" in said
    figures = json.loads(exp_file(repo, "orca", "metrics/eval.json"))
    assert figures["pairs"] == 20 and 0 <= figures["win_rate"] <= 1
    assert figures["sets"]["other"]["pairs"] >= 150
