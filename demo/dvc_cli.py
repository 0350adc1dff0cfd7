"""DVC's own command line, as the demo runs it, without two messages a demo user cannot act on.

* "No file hash info found for '...'. It won't be created.": one per output when an experiment
  starts from a commit without a dvc.lock (every fresh clone). The outputs do not exist yet;
  the stages are about to make them.
* "failed to run: python -m stages.<name>, exited with 130": the stage was interrupted and has
  already said so in one line, with what was kept and how to resume.

Everything else DVC prints is left as it is. Run as `python -m demo.dvc_cli ARGS`.
"""

from __future__ import annotations

import logging
import sys

import dvc  # noqa: F401  (importing dvc sets up its console log handlers)
from dvc.cli import main

NOT_ACTIONABLE = ("No file hash info found for", "exited with 130")


def actionable(record: logging.LogRecord) -> bool:
    """False for the messages above; the text of a logged exception includes its causes."""
    text, error = record.getMessage(), record.exc_info[1] if record.exc_info else None
    while error is not None:
        text, error = f"{text} {error}", error.__cause__
    return not any(phrase in text for phrase in NOT_ACTIONABLE)


if __name__ == "__main__":
    for name in ("dvc", "dvc_data"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(actionable)
    sys.exit(main(sys.argv[1:]))
