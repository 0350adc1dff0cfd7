"""docs/figures.md's current figures are generated from the measured runs' records
(docs/figures.jsonl, bench/figures.py): the page never drifts from them."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import figures  # noqa: E402


def test_the_page_holds_the_table_its_records_give() -> None:
    page = (REPO / "docs" / "figures.md").read_text(encoding="utf-8")
    assert page == figures.render(page, figures.read_records()), (
        "docs/figures.md's table differs from docs/figures.jsonl: run python bench/figures.py"
    )


def test_the_newest_record_of_each_measurement_is_shown_where_it_was_first(tmp_path) -> None:
    base = {"command": "c", "machine": "m", "commit": "abc", "date": "2026-12-07"}
    records = [
        {**base, "what": "a", "figure": "1"},
        {**base, "what": "b", "figure": "x | y"},
        {**base, "what": "a", "figure": "2", "commit": "def"},
    ]
    rows = figures.table(records).splitlines()[2:]
    assert rows == [
        "| a | 2 | `c` | m | def, 2026-12-07 |",
        "| b | x \\| y | `c` | m | abc, 2026-12-07 |",
    ]


def test_a_record_without_a_field_is_named_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "figures.jsonl"
    good = {"what": "a", "figure": "1", "command": "c", "machine": "m", "commit": "x", "date": "d"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "machine": ""}) + "\n")
    with pytest.raises(ValueError, match="figures.jsonl line 2: no machine"):
        figures.read_records(path)


def test_a_record_names_this_machine_and_commit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(figures, "RECORDS", tmp_path / "figures.jsonl")
    entry = figures.record("what", "1.5x", "python bench/x.py")
    assert figures.read_records(tmp_path / "figures.jsonl") == [entry]
    assert "core" in entry["machine"] and len(entry["commit"].split("+")[0]) >= 7
