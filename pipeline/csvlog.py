"""CSV files for DVC plots, written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text_atomic


def write_csv_atomic(
    path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]
) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
