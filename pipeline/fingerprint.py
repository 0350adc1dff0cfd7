"""What identifies the inputs of a cached result: a hash of a config and of folders' bytes.

The reference stage's cache and every training checkpoint carry one; a result whose fingerprint
differs from the current inputs' is never used (a stale cache is an error, a stale checkpoint is
not resumed), because DVC keeps both between experiments.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def files(folder: Path) -> list[Path]:
    """Every file under `folder`, in path order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def fed(digest: Any, path: Path) -> Any:
    """`digest` (a hashlib object) updated with the bytes of the file at `path`, read in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest


def fingerprint(config: dict[str, Any], *folders: Path) -> str:
    """sha256 over a config dict and the bytes of every file in `folders`."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for folder in folders:
        for path in files(folder):
            digest.update(str(path.relative_to(folder)).encode())
            fed(digest, path)
    return digest.hexdigest()


def dvc_dir_hash(folder: Path) -> str:
    """The hash DVC 3 records for a folder ("<md5>.dir"): the md5 of the JSON list of its files'
    md5s and paths, sorted by path. A digest a user can match with `dvc.lock` or `dvc add`."""
    entries = [
        {
            "md5": fed(hashlib.md5(), path).hexdigest(),
            "relpath": path.relative_to(folder).as_posix(),
        }
        for path in files(folder)
    ]
    entries.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"
