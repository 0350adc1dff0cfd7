"""What every stage does around its work: where it reads and writes, atomic outputs, progress bars.

Outputs are written under a temporary sibling name and renamed into place when complete, so an
interrupted stage leaves either the previous output or nothing, never half a folder. Paths are
relative to the repository root, as in dvc.yaml.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

MODEL_BASE = Path("models/base")
MODEL_POLICY = Path("models/policy")
DATA_RAW = Path("data/raw")
DATA_SUBSAMPLED = Path("data/subsampled")
DATA_TOKENIZED = Path("data/tokenized")
DATA_REFERENCE = Path("data/reference")
REPORTS = Path("reports")
METRICS = Path("metrics")
PLOTS = Path("plots")
CHECKPOINTS = Path("checkpoints/train")
REGISTRY = Path("registry")
# Name of the resolved-params file saved beside every artifact.
RESOLVED_PARAMS = "resolved_params.json"


class StageError(Exception):
    """An expected failure (bad params or data, no network, out of memory): the stage prints its
    message as one line and exits 1. Anything else is a bug and keeps its traceback."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main; a StageError becomes one line on stderr and exit status 1."""
    try:
        main()
    except StageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def repo_root() -> Path:
    """The repository root: DVC_ROOT when DVC runs the stage in a temporary or queued copy (the
    copy is deleted afterwards; what must outlive it lives at the real root), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def asset_cache_dir() -> Path:
    """Cache for the locally built demo model and dataset (like the hub's download cache)."""
    default = Path.home() / ".cache" / "dpo-qwen3"
    return Path(os.environ.get("DPO_QWEN3_CACHE", default))


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; it replaces `target` on success.

    The temporary folder lives in the same parent so the final rename never crosses filesystems.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temporary sibling file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON (indented, keys sorted, trailing newline) written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv_atomic(
    path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]
) -> None:
    """Rows as CSV with exactly `columns` (for DVC plots), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm that stays readable in logs: live on a terminal, a line every 30 s otherwise (DVC,
    CI, nohup)."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
