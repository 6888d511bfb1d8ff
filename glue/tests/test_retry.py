"""Backoff and the root cause of network errors (fieldgate.retry)."""

from __future__ import annotations

import pytest
import requests
from support import free_port

from fieldgate.retry import Backoff, root_cause


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(1.0, 5.0)
    assert [b.next() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    b.reset()
    assert b.next() == 1.0


def test_backoff_jitter_stays_within_half_to_full_delay() -> None:
    b = Backoff(2.0, 16.0, jitter=True)
    for want in (2.0, 4.0, 8.0, 16.0, 16.0):
        got = b.next()
        assert want / 2 <= got <= want


def test_backoff_never_overflows() -> None:
    b = Backoff(0.01, 300.0)
    for _ in range(2000):
        assert b.next() <= 300.0


def test_root_cause_of_a_refused_connection() -> None:
    port = free_port()
    with pytest.raises(requests.ConnectionError) as info:
        requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert root_cause(info.value) == "Connection refused"


def test_root_cause_follows_chains_and_survives_cycles() -> None:
    inner = OSError(111, "Connection refused")
    outer = RuntimeError("wrapped")
    outer.__cause__ = inner
    assert root_cause(outer) == "Connection refused"
    a, b = ValueError("a: [Errno 5] x: I/O trouble"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert root_cause(a) == "b"
    assert root_cause(ValueError("[Errno 2] No such file: gone")) == "gone"
