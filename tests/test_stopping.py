"""A stage stops cleanly however it is started and however the stop arrives, on real processes:
SIGINT or SIGTERM with SIGINT inherited as ignored (a script's `cmd &`), and the death of the
process that ran it, directly or through a shell (`dvc repro` killed by SIGTERM)."""

from __future__ import annotations

import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

# A stage that works until stopped, saying when it has started.
STAGE = """
import sys, time
from pipeline.stage_io import run_stage
def main():
    print("working", flush=True)
    while True:
        time.sleep(0.05)
sys.argv[0] = "looping.py"
run_stage(main)
"""


def ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a non-interactive shell's `&` starts it


def start(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, **kwargs
    )
    deadline = time.monotonic() + 60
    while "working" not in log.read_text():
        assert started.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return started


def wait_for_exit(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stage_started_with_sigint_ignored_stops_on_either_signal(tmp_path, stop) -> None:
    log = tmp_path / "log"
    stage = start([sys.executable, "-c", STAGE], log, preexec_fn=ignoring_sigint)
    stage.send_signal(stop)
    assert stage.wait(timeout=30) == 130
    assert log.read_text().splitlines()[-1] == "interrupted: looping: no output written"


# A stop sent while a database write is under way, as MLflow's store makes one.
WRITING = """
import os, signal, sys, time
from sqlalchemy import create_engine, text
from pipeline.stopping import stop_on_signals
stop_on_signals()
engine = create_engine("sqlite:///" + sys.argv[1])
with engine.connect() as connection:
    connection.execute(text("create table runs (status text)"))
    connection.execute(text("insert into runs values ('RUNNING')"))
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.002)  # raised here, the stop would leave the transaction open
    connection.commit()
print("written", flush=True)
try:
    time.sleep(10)
except KeyboardInterrupt:
    with engine.connect() as connection:  # what ending the run KILLED does
        connection.execute(text("update runs set status = 'KILLED'"))
        connection.commit()
    print("stopped", flush=True)
"""


def test_a_stop_during_a_database_write_is_raised_once_the_write_is_done(tmp_path) -> None:
    database = tmp_path / "store.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", WRITING, str(database)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "written\nstopped\n"), done.stderr
    with sqlite3.connect(database, timeout=0) as connection:  # and no lock is left behind
        assert connection.execute("select status from runs").fetchall() == [("KILLED",)]


# A connection that is never given back (leaked, or a store that does not answer).
HELD = """
import os, signal, sys, time
from sqlalchemy import create_engine, text
from pipeline import stopping
stopping.stop_on_signals()
stopping.WAIT_AT_MOST_S = 0.5
connection = create_engine("sqlite:///" + sys.argv[1]).connect()
connection.execute(text("select 1"))
sent = time.monotonic()
os.kill(os.getpid(), signal.SIGTERM)
try:
    while time.monotonic() - sent < 10:
        time.sleep(0.01)
except KeyboardInterrupt:
    print(f"{time.monotonic() - sent:.2f}", flush=True)
"""


def test_a_stop_waits_for_a_held_connection_only_so_long(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", HELD, str(tmp_path / "store.db")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout, done.stderr
    assert 0.5 <= float(done.stdout) < 5  # raised once it had waited WAIT_AT_MOST_S


@pytest.mark.slow
@pytest.mark.parametrize("through_shell", [False, True])
def test_a_stage_stops_when_the_process_that_ran_it_dies(tmp_path, through_shell) -> None:
    """The runner (DVC's stand-in) is killed outright; the stage, run directly or through
    `sh -c` as DVC runs a stage command, stops within seconds with its interrupted line."""
    log, pid_file = tmp_path / "log", tmp_path / "stage.pid"
    record = f"import os; open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
    stage = [sys.executable, "-c", record + STAGE]
    if through_shell:
        stage = ["/bin/sh", "-c", shlex.join(stage)]  # dash: the stage is the shell's child
    runner = f"import subprocess, sys; subprocess.run({stage!r}); sys.exit(0)"
    parent = start([sys.executable, "-c", runner], log, preexec_fn=ignoring_sigint)
    stage_pid = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    assert wait_for_exit(stage_pid, 30), "the stage ran on as an orphan"
    assert log.read_text().splitlines()[-1] == "interrupted: looping: no output written"


def test_the_demo_starts_dvc_with_the_sigint_it_passes_on_at_its_default(tmp_path) -> None:
    """`run_to_the_end` started from a script's `&` (SIGINT ignored): its child still acts on
    SIGINT, the signal the demo passes on to DVC's process group."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    wrapper = (
        "from pipeline.stopping import run_to_the_end\n"
        f"import os, sys; run_to_the_end([sys.executable, '-c', {probe!r}], dict(os.environ))"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=ignoring_sigint,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "True"


# A server stand-in: says it is up, writes its pid, and serves until SIGINT (as uvicorn does).
SERVER = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
print("working", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.slow
@pytest.mark.parametrize("parent_dies", [False, True])
def test_a_wrapped_command_stops_with_its_caller(tmp_path, parent_dies) -> None:
    """`python -m pipeline.stopping CMD`, as `make serve` runs MLflow's server: SIGTERM to the
    wrapper alone (a script's `&`, SIGINT ignored) stops CMD, and so does the death of the
    process that started the wrapper (make, killed)."""
    log, pid_file = tmp_path / "log", tmp_path / "server.pid"
    server = [sys.executable, "-c", SERVER, str(pid_file)]
    wrapped = [sys.executable, "-m", "pipeline.stopping", *server]
    if parent_dies:
        runner = f"import subprocess; subprocess.run({wrapped!r})"
        caller = start([sys.executable, "-c", runner], log, preexec_fn=ignoring_sigint)
        caller.kill()
        caller.wait()
    else:
        caller = start(wrapped, log, preexec_fn=ignoring_sigint)
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=30) == 130
    assert wait_for_exit(int(pid_file.read_text()), 30), "the wrapped command ran on"
