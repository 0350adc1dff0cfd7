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


def fingerprint(config: dict[str, Any], *folders: Path) -> str:
    """sha256 over a config dict and the bytes of every file in `folders`."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 23):
                    digest.update(chunk)
    return digest.hexdigest()


def dvc_dir_hash(folder: Path) -> str:
    """The hash DVC 3 records for a folder ("<md5>.dir"): the md5 of the JSON list of its files'
    md5s and paths, sorted by path. A digest a user can match with `dvc.lock` or `dvc add`."""
    entries = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        md5 = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                md5.update(chunk)
        entries.append({"md5": md5.hexdigest(), "relpath": path.relative_to(folder).as_posix()})
    entries.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"
