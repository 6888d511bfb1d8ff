"""The test fixture's PostgreSQL server does not outlive a test run that is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pgserver
import pytest
from support import wait_until

STARTER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import pgserver
server = pgserver.start()
print(server.root, server.proc.pid, flush=True)
time.sleep(600)
"""


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_test_run_leaves_no_server_behind() -> None:
    if not pgserver.available():
        pytest.fail("Debian's postgresql 15 is not installed (scripts/bootstrap.sh installs it)")
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    root, pgid = starter.stdout.readline().split()
    assert Path(root, "data", "postmaster.pid").exists()
    starter.send_signal(signal.SIGKILL)  # no teardown runs
    starter.wait()
    wait_until(lambda: _gone(int(pgid)), timeout=60, what="the server stopped")
    wait_until(lambda: not Path(root).exists(), timeout=30, what="its directory removed")


def test_stop_ends_the_watchdog_and_the_server() -> None:
    if not pgserver.available():
        pytest.fail("Debian's postgresql 15 is not installed (scripts/bootstrap.sh installs it)")
    server = pgserver.start()
    assert server.proc is not None and server.watchdog is not None
    pgid, watchdog = server.proc.pid, server.watchdog.pid
    server.stop()
    assert not server.root.exists()
    # a killed group's processes are gone once reaped (the watchdog's tail by init)
    wait_until(lambda: _gone(pgid) and _gone(watchdog), timeout=30, what="both groups gone")
