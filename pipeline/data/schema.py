"""The one record type of the data stages, and its validation.

download_data turns every preference format it reads (`pipeline.data.formats`) into PAIRS_SCHEMA
rows; subsample adds a pair id and tokenize turns the texts into token ids. Every stage checks
what it reads against these schemas (`read_split` for fetched parquet, `load_tokenized` for the
tokenized Arrow shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stage_io import StageError

TURN = pa.struct([("role", pa.string()), ("content", pa.string())])

# One preference pair. The prompt is `context` (an optional system turn, then earlier user and
# assistant turns; empty for a single question) followed by the user turn `question`; `chosen`
# is the preferred answer to it, `rejected` the other. `question_id` is the prompt's identity
# (the question's URL on stack-exchange-paired, a prompt id column, else a hash of the prompt),
# so held-out selection keeps a prompt's pairs together and evaluation groups them.
PAIRS_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("context", pa.list_(TURN)),
        ("question", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
    ]
)

# Added by subsample: a pair id unique within the split (its row in the fetched split).
ID_FIELDS = [pa.field("question_id", pa.string()), pa.field("pair_id", pa.int64())]
SUBSAMPLED_SCHEMA = pa.schema(list(PAIRS_SCHEMA) + [pa.field("pair_id", pa.int64())])

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


def read_split(folder: Path) -> pa.Table:
    """All parquet files of one fetched split as one table of PAIRS_SCHEMA rows."""
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {folder}: run the download stage first")
    tables = [conform(pq.read_table(f), PAIRS_SCHEMA, str(f)) for f in files]
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
