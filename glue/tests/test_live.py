"""The collector's live state on its abstract socket (fieldgate.live), without a collector."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from support import wait_until

from fieldgate import live, store


def test_the_state_is_answered_until_closed(tmp_path: Path) -> None:
    db = tmp_path / "data_store.db"
    assert live.ask(db) is None
    state = live.LiveState(db)
    try:
        first = live.ask(db)
        assert first is not None and first["state"] == "starting" and first["pid"] == os.getpid()
        state.set("paused: disk full (the store could not commit)")
        since = live.ask(db)
        assert since is not None
        assert since["state"] == "paused: disk full (the store could not commit)"
        assert since["since"] >= first["since"] and since["now"] >= since["since"]
        state.set("paused: disk full (the store could not commit)")  # same state: same since
        again = live.ask(db)
        assert again is not None and again["since"] == since["since"]
        assert live.ask(tmp_path / "other.db") is None  # each store its own name
    finally:
        state.close()
    assert live.ask(db) is None


def test_a_forked_child_does_not_keep_the_name(tmp_path: Path) -> None:
    """The store writer is forked from the collector and outlives a killed collector for a
    moment: it must not hold the name, or the restarted collector could not answer."""
    db = tmp_path / "data_store.db"
    r, w = os.pipe()
    collector = os.fork()
    if collector == 0:
        os.close(r)
        live.LiveState(db)
        writer = os.fork()
        if writer == 0:
            time.sleep(30)
            os._exit(0)
        os.write(w, f"{writer}\n".encode())
        time.sleep(30)
        os._exit(0)
    os.close(w)
    writer = int(os.read(r, 100))
    os.close(r)
    try:
        wait_until(lambda: live.ask(db) is not None, what="the first collector answering")
        os.kill(collector, signal.SIGKILL)
        os.waitpid(collector, 0)
        restarted = live.LiveState(db)  # the writer still runs
        try:
            answer = live.ask(db)
            assert answer is not None and answer["pid"] == os.getpid()
        finally:
            restarted.close()
    finally:
        os.kill(writer, signal.SIGKILL)


@pytest.mark.root
def test_an_answer_from_another_user_is_not_believed(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (to serve the name as another user)")
    db = tmp_path / "data_store.db"
    name = live.socket_name(db)
    child = os.fork()
    if child == 0:
        os.setgid(65534)
        os.setuid(65534)  # nobody: squats the collector's name with a lie
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(name)
        srv.listen(1)
        while True:
            peer, _ = srv.accept()
            lie = {"pid": 1, "state": "running", "since": store.now_ms(), "now": store.now_ms()}
            peer.sendall(json.dumps(lie).encode() + b"\n")
            peer.close()
    try:
        wait_until(lambda: _bound(name), what="the squatter listening")
        assert live.ask(db) is None
        # and a real collector cannot take the name: it says so and goes on without
        state = live.LiveState(db)
        state.close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def _bound(name: bytes) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(name)
        except OSError:
            return False
        return True
