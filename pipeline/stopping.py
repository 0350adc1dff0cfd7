"""Stopping a run however it was started: the signals a stop arrives by, and a parent that dies.

A terminal's Ctrl-C sends SIGINT to the foreground process group; `timeout`, job schedulers, CI
runners and container platforms send SIGTERM, often to the started process alone. A script's
`cmd &` starts its command with SIGINT ignored, an ignored disposition is inherited through fork
and exec, and Python then installs no KeyboardInterrupt handler at all: so every handler here is
installed explicitly, and children are started with the default dispositions a stop relies on.

A stage whose DVC parent is killed outright (SIGTERM makes `dvc repro` exit at once) would run on
as an orphan, holding the device and its MLflow run: it watches its parent, and the process above
a shell that DVC ran it through, and stops as on SIGTERM when either is gone.

A stop raised in the middle of a database write (MLflow's or Optuna's SQL store, through
SQLAlchemy) can leave the transaction open and SQLite's file locked, so that ending the run
KILLED then fails, or be swallowed by the store's retry loop and never stop the run: while the
main thread holds a database connection, a stop waits and is raised once it is given back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SHELLS = {"sh", "dash", "bash", "zsh"}  # what DVC runs a stage command through ($SHELL -c)
WATCH_EVERY_S = 1.0


RETRY_S = 0.05  # how soon a stop that waited for a database write is tried again
# A write takes milliseconds; a connection held longer than this (leaked, or a store that does
# not answer) must not hold off the stop: it is raised then, wherever the main thread is.
WAIT_AT_MOST_S = 10.0
_held = 0  # database connections the main thread has checked out of SQLAlchemy's pools
_retry: threading.Timer | None = None  # the stop that waits, to be sent again
_waiting_since: float | None = None  # when the stop that waits first arrived


def stop_on_signals() -> None:
    """SIGINT and SIGTERM both raise KeyboardInterrupt in the main thread, whatever dispositions
    the process inherited, outside database writes."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _raise_interrupt)
    try:
        from sqlalchemy import event
        from sqlalchemy.pool import Pool
    except ImportError:  # no SQL store in this environment
        return
    if not event.contains(Pool, "checkout", _checked_out):
        event.listen(Pool, "checkout", _checked_out)
        event.listen(Pool, "checkin", _checked_in)


def _raise_interrupt(signum: int, frame: Any) -> None:
    global _retry, _waiting_since
    now = time.monotonic()
    _waiting_since = _waiting_since or now
    waited_enough = now - _waiting_since >= WAIT_AT_MOST_S
    if waited_enough or (not _held and not _in_database_code(frame)):
        _waiting_since = None
        raise KeyboardInterrupt(signal.Signals(signum).name)
    if _retry is None:  # else one is on its way
        _retry = threading.Timer(RETRY_S, _send_again, args=(signum,))
        _retry.daemon = True
        _retry.start()


def _send_again(signum: int) -> None:
    global _retry
    _retry = None
    os.kill(os.getpid(), signum)


def _in_database_code(frame: Any) -> bool:
    """Whether the main thread was stopped inside SQLAlchemy (a pool returning a connection,
    after the checkin event, is one place)."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("sqlalchemy."):
            return True
        frame = frame.f_back
    return False


def _checked_out(*args: Any) -> None:
    global _held
    if threading.current_thread() is threading.main_thread():
        _held += 1


def _checked_in(*args: Any) -> None:
    global _held
    if threading.current_thread() is threading.main_thread() and _held:
        _held -= 1


def default_stop_signals() -> None:
    """For a child's preexec_fn: SIGINT and SIGTERM at their defaults, not the caller's (a
    script's `&` leaves SIGINT ignored), so a stop passed on to the child reaches it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_to_the_end(cmd: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run `cmd` in a process group of its own and wait for it, even through Ctrl-C.

    Ctrl-C or SIGTERM here is passed on as SIGINT: the running stage stops, says what it kept,
    and DVC removes its temporary copy of the repository and its "Running" entry. (Killing DVC
    instead, as `subprocess.call` does on KeyboardInterrupt, left both behind.) A stage ignores
    a second Ctrl-C while it cleans up; DVC between stages takes it as its own interrupt.
    Returns (exit status, whether it was interrupted).
    """
    # The child's own SIGINT disposition, not this process's: started by a script's `&`, it
    # would inherit "ignored", and the SIGINT passed on below would reach no one.
    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=default_stop_signals)
    interrupted = False

    def pass_on(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        os.killpg(child.pid, signal.SIGINT)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait(), interrupted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_with_parent() -> None:
    """Send this process SIGTERM once its parent, or the process that started that parent when
    the parent is a shell, is gone (a daemon thread looks every second)."""
    watched = [os.getppid()]
    if _name_of(watched[0]) in SHELLS:
        above = _parent_of(watched[0])
        if above is not None:
            watched.append(above)
    thread = threading.Thread(target=_watch, args=(watched,), name="stop-with-parent", daemon=True)
    thread.start()


def _watch(watched: list[int]) -> None:
    parent = watched[0]
    while os.getppid() == parent and all(_alive(pid) for pid in watched[1:]):
        time.sleep(WATCH_EVERY_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as gone where /proc says)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): the signal probe above is all there is


def _name_of(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def main(argv: list[str]) -> int:
    """`python -m pipeline.stopping CMD ...`: run CMD so that it stops however its caller is
    stopped. Make, for one, dies of SIGTERM and leaves its recipe's server running; this sits
    between the two, passes a stop on to CMD's process group as SIGINT, and stops it too when
    the process that started this one is gone. Exits with CMD's status, 130 when stopped."""
    if not argv:
        print("usage: python -m pipeline.stopping CMD [ARG ...]", file=sys.stderr)
        return 2
    stop_with_parent()
    status, interrupted = run_to_the_end(argv, dict(os.environ))
    return 130 if interrupted else status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
