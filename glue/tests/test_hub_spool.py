"""An upload's body goes to a spooled temporary file: in memory while small, on disk once
larger than the hub's spool size, refused as soon as it passes the upload limit (the hub
never holds a whole batch zip in memory). The request is a real WSGI request of Flask's."""

from __future__ import annotations

import os

import pytest
from flask import Flask

from fieldgate.hub.uploads import spool_body
from fieldgate.hub.web import ApiError

APP = Flask(__name__)


def spooled(body: bytes, *, limit: int, memory: int) -> tuple[bool, bytes]:
    with (
        APP.test_request_context("/u", method="PUT", data=body),
        spool_body(limit, memory) as spool,
    ):
        return spool._rolled, spool.read()  # _rolled: on disk (tempfile's own flag)


def test_a_small_body_stays_in_memory() -> None:
    body = os.urandom(4096)
    assert spooled(body, limit=1 << 20, memory=1 << 16) == (False, body)


def test_a_body_larger_than_the_spool_size_goes_to_disk() -> None:
    body = os.urandom(3 << 20)  # three reads of 1 MiB, spool size 256 KiB
    assert spooled(body, limit=8 << 20, memory=256 << 10) == (True, body)


def test_a_body_over_the_limit_is_413_before_it_is_read() -> None:
    with pytest.raises(ApiError) as refused:
        spooled(os.urandom(2 << 20), limit=1 << 20, memory=1 << 16)
    assert refused.value.status == 413
    assert "at most 1048576" in refused.value.message


def test_an_empty_body_is_400() -> None:
    with pytest.raises(ApiError) as refused:
        spooled(b"", limit=1 << 20, memory=1 << 16)
    assert refused.value.status == 400
