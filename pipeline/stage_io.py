"""What every stage does around its work: where it reads and writes, atomic outputs, progress bars.

Outputs are written under a temporary sibling name and renamed into place when complete, so an
interrupted stage leaves either the previous output or nothing, never half a folder. Paths are
relative to the repository root, as in dvc.yaml.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline.stopping import stop_on_signals, stop_with_parent

MODEL_BASE = Path("models/base")
MODEL_POLICY = Path("models/policy")
MODEL_REWARD = Path("models/reward")
DATA_RAW = Path("data/raw")
DATA_SUBSAMPLED = Path("data/subsampled")
DATA_TOKENIZED = Path("data/tokenized")
DATA_REFERENCE = Path("data/reference")
DATA_EVAL_SETS = Path("data/eval_sets")  # eval.datasets: <name>/{pairs.parquet,tokenized,reference}


EVAL_SET_PAIRS = "pairs.parquet"  # an extra set's held-out pair records (SUBSAMPLED_SCHEMA)


def eval_set(name: str) -> tuple[Path, Path]:
    """An extra held-out set's (tokenized split, reference log-probs) folders."""
    return DATA_EVAL_SETS / name / "tokenized", DATA_EVAL_SETS / name / "reference"


DATA_JUDGE_BASE = Path("data/judge_base")  # the base model's answers to the judge's questions
REPORTS = Path("reports")
METRICS = Path("metrics")
PLOTS = Path("plots")
# Resumable training state, at the real repository root (`repo_root`): a re-run in a new temporary
# copy (`dvc exp run --temp`, a queued run, `python -m demo`) finds it there.
CHECKPOINTS = Path("checkpoints/train")
REGISTRY = Path("registry")
# Name of the resolved-params file saved beside every artifact.
RESOLVED_PARAMS = "resolved_params.json"


class StageError(Exception):
    """An expected failure (bad params or data, no network, out of memory): the stage prints its
    message as one line and exits 1. Anything else is a bug and keeps its traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what was kept (raised by a stage that knows, e.g. the last
    checkpoint); a bare KeyboardInterrupt means the stage wrote no output (outputs are atomic)."""


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def require(module: str, extra: str, command: str) -> None:
    """Stop in one line when `command` needs an optional dependency that is not installed."""
    if importlib.util.find_spec(module) is None:
        raise StageError(
            f"{command} needs {module}, from the {extra} extra: pip install -e '.[{extra}]' "
            "(make install installs it)"
        )


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main. An expected failure becomes one `error:` line and exit status 1; Ctrl-C
    or SIGTERM one `interrupted:` line and exit status 130. Either way an MLflow run the stage had
    open ends FAILED or KILLED (not FINISHED, as MLflow's exit hook would mark it), and a
    `dvc exp run -S` in the workspace says how to restore params.yaml. Either signal stops it
    whatever dispositions it inherited, and so does the death of the DVC process that ran it
    (`pipeline.stopping`)."""
    stop_on_signals()
    stop_with_parent()
    stage = Path(sys.argv[0]).stem
    try:
        main()
    except StageError as error:
        _close_tracking("FAILED")
        _exit(f"error: {error}{_params_hint()}", 1)
    except KeyboardInterrupt as interrupt:
        for stop in (signal.SIGINT, signal.SIGTERM):  # a second stop must not cut the cleanup
            signal.signal(stop, signal.SIG_IGN)
        _close_tracking("KILLED")
        kept = str(interrupt) if isinstance(interrupt, Interrupted) else "no output written"
        _exit(f"interrupted: {stage}: {kept}{_params_hint()}", INTERRUPTED_EXIT)


def _exit(line: str, status: int) -> None:
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(status) from None


def _close_tracking(status: str) -> None:
    """End the MLflow run this process has open, if any, with `status`."""
    mlflow = sys.modules.get("mlflow")  # a stage that never imported MLflow has no run
    if mlflow is not None and mlflow.active_run() is not None:
        with contextlib.suppress(Exception):  # the message matters more than the status
            mlflow.end_run(status)


def _params_hint() -> str:
    """Under `dvc exp run` in the workspace, DVC has written the experiment's values into
    params.yaml and leaves them there when a stage fails. It also leaves git's index entry for
    params.yaml with the committed blob but the new file's size and time, so `git status` shows
    nothing and `git checkout params.yaml` restores nothing. Writing that entry back without its
    cached file stat (same blob) makes git compare contents again, so the hint's command works."""
    root = os.environ.get("DVC_ROOT")
    in_workspace = root is not None and Path(root).resolve() == Path.cwd().resolve()
    if not os.environ.get("DVC_EXP_NAME") or not in_workspace:
        return ""  # not an experiment, or one in a temporary copy that DVC deletes
    try:
        entry = _git("ls-files", "--stage", "params.yaml").split()
        if _git("hash-object", "params.yaml") == _git("rev-parse", "HEAD:params.yaml"):
            return ""
        _git("update-index", "--index-info", stdin=f"{entry[0]} {entry[1]}\tparams.yaml\n")
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""  # not a git checkout, or params.yaml not committed: nothing to restore
    return (
        " (params.yaml keeps this experiment's values: `git diff params.yaml` shows them, "
        "`git checkout params.yaml` restores the committed ones)"
    )


def _git(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["git", *args], input=stdin, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def repo_root() -> Path:
    """The repository root: DVC_ROOT when DVC runs the stage in a temporary or queued copy (the
    copy is deleted afterwards; what must outlive it lives at the real root), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


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
