"""The one record type of the data stages, and its validation.

Raw rows have exactly the columns of `lvwerra/stack-exchange-paired`. Subsample adds two ids and
tokenize turns the texts into token ids; every stage checks what it reads against these schemas
(`read_split` for fetched parquet, `load_tokenized` for the tokenized Arrow shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stage_io import StageError

# The hub dataset's columns, in its order. response_j is the preferred answer.
SOURCE_SCHEMA = pa.schema(
    [
        ("qid", pa.int64()),
        ("question", pa.string()),
        ("date", pa.string()),
        ("metadata", pa.list_(pa.string())),
        ("response_j", pa.string()),
        ("response_k", pa.string()),
    ]
)

# Added by subsample: a question's identity (its URL; qid is unique only within one site) and a
# pair id unique within the split, so evaluation can group answers by question.
ID_FIELDS = [pa.field("question_id", pa.string()), pa.field("pair_id", pa.int64())]
SUBSAMPLED_SCHEMA = pa.schema(list(SOURCE_SCHEMA) + ID_FIELDS)

# Written by tokenize. Completion ids exclude the prompt and end with EOS unless truncated.
TOKENIZED_SCHEMA = pa.schema(
    ID_FIELDS
    + [
        pa.field("prompt_input_ids", pa.list_(pa.int32())),
        pa.field("chosen_input_ids", pa.list_(pa.int32())),
        pa.field("rejected_input_ids", pa.list_(pa.int32())),
    ]
)

# Text types that hold the same values as pa.string() once cast.
_STRING_LIKE = {pa.string(), pa.large_string(), pa.string_view()}


class SchemaError(StageError, ValueError):
    """Data that does not have the expected columns or types; the message names them."""


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    if expected == pa.string():
        return actual in _STRING_LIKE
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _compatible(
            actual.value_type, expected.value_type
        )
    if expected == pa.int64():
        return pa.types.is_integer(actual)
    return False


def check_schema(schema: pa.Schema, expected: pa.Schema, origin: str) -> None:
    """Raise SchemaError naming the first missing or mistyped column of `schema`."""
    for field in expected:
        index = schema.get_field_index(field.name)
        if index < 0:
            raise SchemaError(
                f"{origin}: missing column {field.name!r} (expected {field.type}); "
                f"found columns {schema.names}"
            )
        actual = schema.field(index).type
        if not _compatible(actual, field.type):
            raise SchemaError(
                f"{origin}: column {field.name!r} has type {actual}, expected {field.type}"
            )


def conform(table: pa.Table, expected: pa.Schema, origin: str) -> pa.Table:
    """Check, then select and cast `table` to exactly `expected` (extra columns are dropped)."""
    check_schema(table.schema, expected, origin)
    return table.select(expected.names).cast(expected)


def question_key(qid: int, metadata: list[str] | None) -> str:
    """A question's identity: its URL (metadata[0]) or, without one, its qid."""
    if metadata and metadata[0]:
        return metadata[0]
    return f"qid:{qid}"


def read_split(folder: Path) -> pa.Table:
    """All parquet files of one fetched split as one table in the source schema."""
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {folder}: run the download stage first")
    tables = [conform(pq.read_table(f), SOURCE_SCHEMA, str(f)) for f in files]
    return pa.concat_tables(tables)


def tokenized_features() -> Any:
    """TOKENIZED_SCHEMA as `datasets.Features`: the columns tokenize writes."""
    import datasets  # here: the download and subsample stages never need it

    return datasets.Features.from_arrow_schema(TOKENIZED_SCHEMA)


def load_tokenized(folder: Path) -> Any:
    """A tokenized split (memory-mapped Arrow shards) as a `datasets.Dataset`, checked against
    TOKENIZED_SCHEMA; a missing split or a wrong column is a SchemaError naming the folder."""
    import datasets

    if not (Path(folder) / "dataset_info.json").is_file():
        raise SchemaError(f"{folder}: no tokenized split there: run the tokenize stage first")
    dataset = datasets.load_from_disk(str(folder))
    check_schema(dataset.data.schema, TOKENIZED_SCHEMA, str(folder))
    return dataset
