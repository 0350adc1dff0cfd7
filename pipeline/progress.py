"""Progress bars that stay readable in logs: live on a terminal, a line every 30 s otherwise."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm with a long refresh interval when stderr is not a terminal (DVC, CI, nohup)."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
