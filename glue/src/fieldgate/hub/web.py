"""What every view of the hub shares: its settings, its storage, errors as JSON.

Views reach the storage with :func:`storage` (one per worker thread, opened on first use,
after gunicorn forked: a database connection is never shared between threads) and refuse
a request with :class:`ApiError`, which the application answers as
``{"error": "<one sentence>"}`` and logs with the gateway and batch in ``g.ctx``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected

from fieldgate.hub.passwords import VerifiedCache
from fieldgate.hub.storage import HubStorage
from fieldgate.redact import redact

log = logging.getLogger("fieldgate.hub")

#: Where the settings live in ``app.extensions``.
EXTENSION = "fieldgate.hub"


class ApiError(Exception):
    """An answer with an HTTP status, one sentence and optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ClientTooSlow(BrokenPipeError):
    """A client missed a deadline of the hub's worker (:mod:`fieldgate.hub.worker`): its
    request is abandoned and its connection closed (a view answers 408 if it can)."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EPIPE, what)


@dataclass
class HubSettings:
    """One hub application's settings and its per-thread storage."""

    factory: Callable[[], HubStorage]
    upload_ttl_secs: float
    max_upload_bytes: int
    #: An upload is kept in memory up to this size, then in a temporary file.
    spool_memory_bytes: int = 8 * 1024 * 1024
    #: Credentials verified lately (HTTP Basic sends them with every request).
    verified: VerifiedCache = field(default_factory=VerifiedCache)
    _local: threading.local = field(default_factory=threading.local)
    #: The storages this process opened (its threads'), so that it can close them all.
    _opened: list[tuple[int, HubStorage]] = field(default_factory=list)
    _opened_lock: threading.Lock = field(default_factory=threading.Lock)

    def storage(self) -> HubStorage:
        """This thread's storage (a new one after a fork)."""
        mine = getattr(self._local, "storage", None)
        if mine is None or mine[0] != os.getpid():
            mine = self._local.storage = (os.getpid(), self.factory())
            with self._opened_lock:
                self._opened.append(mine)
        return mine[1]

    def close_storages(self) -> None:
        """Close every storage this process opened (its threads' connections; a worker that
        stops, after its threads are done)."""
        with self._opened_lock:
            mine = [st for pid, st in self._opened if pid == os.getpid()]
            self._opened.clear()
        for st in mine:
            _close(st)

    def discard_storage(self) -> None:
        """Forget this thread's storage (after its connection failed); the next request
        opens a new one."""
        mine = getattr(self._local, "storage", None)
        self._local.storage = None
        if mine is not None and mine[0] == os.getpid():
            with self._opened_lock:
                if mine in self._opened:
                    self._opened.remove(mine)
            _close(mine[1])


def _close(st: HubStorage) -> None:
    try:
        st.close()
    except Exception:  # a broken connection may fail to close: it is gone anyway
        log.debug("closing a storage", exc_info=True)


def settings_of(app: Flask) -> HubSettings:
    return app.extensions[EXTENSION]


def settings() -> HubSettings:
    """The settings of the application serving this request."""
    return settings_of(current_app)


def storage() -> HubStorage:
    """This worker thread's storage."""
    return settings().storage()


#: The largest request body of any endpoint but the batch upload (a manifest is about
#: 400 bytes).
MAX_JSON_BYTES = 256 * 1024


def read_body(size: int) -> bytes:
    """Up to ``size`` bytes of the request body. A client the worker cut off for being too
    slow comes through as the :class:`ClientTooSlow` it is (werkzeug's stream wraps
    whatever the server raised in ClientDisconnected)."""
    try:
        return request.stream.read(size)
    except ClientDisconnected as exc:
        if isinstance(exc.__context__, ClientTooSlow):
            raise exc.__context__ from None
        raise


def json_body() -> dict[str, Any]:
    """The request's JSON object: 413 past :data:`MAX_JSON_BYTES` (read no further), 400
    when it is not a JSON object."""
    length = request.content_length
    if length is not None and length > MAX_JSON_BYTES:
        raise ApiError(413, f"the request body is {length} bytes; at most {MAX_JSON_BYTES}")
    data = read_body(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_JSON_BYTES} bytes")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> tuple[Response, int]:
    """``{"error": message}`` with ``status``, logged with the request's context."""
    path = redact(request.path)
    log.warning("%s %s -> %d%s: %s", request.method, path, status, g.get("ctx", ""), message)
    response = jsonify(error=message)
    response.headers.update(headers or {})
    return response, status
