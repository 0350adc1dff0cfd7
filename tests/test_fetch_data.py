import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo.dataset import SOURCE_SCHEMA
from pipeline.data.schema import PAIRS_SCHEMA, SchemaError, read_split
from pipeline.download.data import fetch_data
from pipeline.download.shards import Shard, list_shards, open_dataset, shards_for
from pipeline.params import DataParams
from pipeline.stage_io import StageError
from tests.helpers import NO_COLUMNS, hub_layout, source_rows, table


def data_params(dataset: Path | str, fraction: float = 1.0, eval_size: int = 10) -> DataParams:
    return DataParams(
        dataset=str(dataset),
        revision="main",
        train_dir="data/rl",
        eval_dir="data/evaluation",
        columns=NO_COLUMNS,
        fraction=fraction,
        eval_size=eval_size,
        seed=0,
    )


def test_only_the_shards_the_fraction_needs_are_fetched(tmp_path: Path) -> None:
    shards = [source_rows(10, 2, start=i * 10) for i in range(4)]  # 4 shards x 20 rows
    root = hub_layout(tmp_path / "repo", shards, [source_rows(5, 2, start=100)])
    manifests = fetch_data(data_params(root, fraction=0.3), tmp_path / "raw")
    train = manifests["train"]
    assert train["source_rows"] == 80 and train["rows_needed"] == 24
    assert train["rows_fetched"] == 40 and len(train["shards"]) == 2  # 20 < 24 <= 40
    assert sorted(p.name for p in (tmp_path / "raw" / "train").glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert json.loads((tmp_path / "raw" / "train" / "manifest.json").read_text()) == train
    fetched = read_split(tmp_path / "raw" / "train")
    assert fetched.schema.equals(PAIRS_SCHEMA) and len(fetched) == 40


def test_shards_for_takes_the_shortest_prefix() -> None:
    shards = [Shard("a", 5), Shard("b", 5), Shard("c", 5)]
    assert [s.path for s in shards_for(shards, 1)] == ["a"]
    assert [s.path for s in shards_for(shards, 6)] == ["a", "b"]
    assert [s.path for s in shards_for(shards, 99)] == ["a", "b", "c"]


def test_missing_column_is_named(tmp_path: Path) -> None:
    root = hub_layout(tmp_path / "repo", [source_rows(2, 1)], [source_rows(2, 1)])
    bad = table(source_rows(2, 1)).drop_columns(["response_k"])
    pq.write_table(bad, root / "data/rl/train-00000-of-00001.parquet")
    with pytest.raises(SchemaError, match=r"cannot tell the preference format of columns \['qid'"):
        fetch_data(data_params(root), tmp_path / "raw")


def test_a_qid_of_another_type_still_names_its_question(tmp_path: Path) -> None:
    """qid only names a question without a URL: a string qid is read, not refused."""
    rows = source_rows(2, 1)
    for row in rows:
        row["qid"], row["metadata"] = str(row["qid"]), []
    schema = pa.schema(
        [f if f.name != "qid" else pa.field("qid", pa.string()) for f in SOURCE_SCHEMA]
    )
    root = hub_layout(tmp_path / "repo", [source_rows(2, 1)], [source_rows(2, 1)])
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema),
        root / "data/evaluation/train-00000-of-00001.parquet",
    )
    fetch_data(data_params(root), tmp_path / "raw")
    assert read_split(tmp_path / "raw" / "eval")["question_id"].to_pylist() == ["qid:0", "qid:1"]


def test_jsonl_shards_load_through_the_same_path(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for folder, start in (("data/rl", 0), ("data/evaluation", 50)):
        (root / folder).mkdir(parents=True)
        lines = [json.dumps(r) for r in source_rows(3, 2, start=start)]
        (root / folder / "train-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n")
    manifests = fetch_data(data_params(root), tmp_path / "raw")
    assert manifests["train"]["rows_fetched"] == 6
    assert read_split(tmp_path / "raw" / "eval").schema.equals(PAIRS_SCHEMA)


def test_large_string_columns_are_normalised(tmp_path: Path) -> None:
    root = hub_layout(tmp_path / "repo", [source_rows(2, 1)], [source_rows(2, 1)])
    path = root / "data/rl/train-00000-of-00001.parquet"
    pq.write_table(
        pq.read_table(path).cast(
            pa.schema(
                [
                    pa.field(f.name, pa.large_string()) if f.type == pa.string() else f
                    for f in SOURCE_SCHEMA
                ]
            )
        ),
        path,
    )
    fetch_data(data_params(root), tmp_path / "raw")
    assert pq.read_schema(tmp_path / "raw/train/part-00000.parquet").equals(PAIRS_SCHEMA)


def test_dataset_sources_are_resolved(tmp_path: Path) -> None:
    fs, root = open_dataset("lvwerra/stack-exchange-paired", "main")
    assert root == "datasets/lvwerra/stack-exchange-paired@main"
    assert type(fs).__name__ == "HfFileSystem"
    with pytest.raises(StageError, match="data.dataset: no folder at '.*not a dataset'"):
        open_dataset("not a dataset", "main")
    with pytest.raises(StageError, match=f"no folder at '{tmp_path}/gone'"):
        open_dataset(str(tmp_path / "gone"), "main")  # a path, never a hub lookup
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(StageError, match="is a file"):
        open_dataset(str(tmp_path / "x.parquet"), "main")


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "repo/data/rl").mkdir(parents=True)
    fs, root = open_dataset(str(tmp_path / "repo"), "main")
    with pytest.raises(FileNotFoundError, match=r"no split 'data/rl' in .*: looked for"):
        list_shards(fs, root, "data/rl")


def test_demo_dataset_loads_through_the_hub_layout_path(
    demo_dataset_dir: Path, tmp_path: Path
) -> None:
    manifests = fetch_data(
        data_params(demo_dataset_dir, fraction=0.5, eval_size=50),
        tmp_path / "raw",
    )
    assert manifests["train"]["source_shards"] > 1
    assert manifests["train"]["rows_fetched"] < manifests["train"]["source_rows"]
    assert len(read_split(tmp_path / "raw" / "train")) == manifests["train"]["rows_fetched"]
