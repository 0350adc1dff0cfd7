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
