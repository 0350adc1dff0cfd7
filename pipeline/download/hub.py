"""Failures to reach the Hugging Face Hub, told as one line with the way out."""

from __future__ import annotations

import contextlib
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

from pipeline.stage_io import StageError


@contextlib.contextmanager
def reaching_the_hub(key: str, name: str) -> Iterator[None]:
    """Around calls that download `name` (set by params key `key`): whatever the network or the
    hub raises (no connection, HF_HUB_OFFLINE, a missing repository) becomes a StageError."""
    try:
        yield
    except StageError:
        raise
    except (
        Exception
    ) as error:  # httpx, huggingface_hub and OS errors alike: the hub is out of reach
        first = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        reason = textwrap.shorten(first, 200, placeholder=" ...")
        raise StageError(
            f"{key}: cannot get {name!r} from the Hugging Face Hub ({type(error).__name__}: "
            f"{reason}). Offline? `make demo` runs the offline demo; or set {key} to a local folder"
        ) from error


# A hub repository id: "name" or "owner/name". Anything else (a leading / . ~, more folders) is
# a local path.
HUB_ID = re.compile(r"^(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?$")


def local_folder(key: str, name: str, what: str) -> Path | None:
    """The local folder `name` (params key `key`) names, or None when it is a hub id to fetch.

    A name that can only be a path but is no folder is an error naming it, not a hub lookup.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise StageError(f"{key}: {name!r} is a file, expected {what}")
    if not HUB_ID.match(name):
        raise StageError(f"{key}: no folder at {str(local.absolute())!r} (and not a hub id)")
    return None
