"""What every view of the hub shares: its settings, its storage, errors as JSON.

Views reach the storage with :func:`storage` (one per worker process, opened on first use,
after gunicorn forked) and refuse a request with :class:`ApiError`, which the application
answers as ``{"error": "<one sentence>"}`` and logs with the gateway and batch in ``g.ctx``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Response, current_app, g, jsonify, request

from fieldgate.hub.storage import HubStorage

log = logging.getLogger("fieldgate.hub")

#: Where the settings live in ``app.extensions``.
EXTENSION = "fieldgate.hub"


class ApiError(Exception):
    """An answer with an HTTP status and one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class HubSettings:
    """One hub application's settings and its per-process storage."""

    factory: Callable[[], HubStorage]
    upload_ttl_secs: float
    max_upload_bytes: int
    _per_process: dict[int, HubStorage] = field(default_factory=dict)

    def storage(self) -> HubStorage:
        pid = os.getpid()
        if pid not in self._per_process:
            self._per_process[pid] = self.factory()
        return self._per_process[pid]


def settings() -> HubSettings:
    """The settings of the application serving this request."""
    return current_app.extensions[EXTENSION]


def storage() -> HubStorage:
    """This worker process's storage."""
    return settings().storage()


def json_body() -> dict[str, Any]:
    """The request's JSON object (400 when it is not one)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def error_response(status: int, message: str) -> tuple[Response, int]:
    """``{"error": message}`` with ``status``, logged with the request's context."""
    path = redact_upload_token(request.path)
    log.warning("%s %s -> %d%s: %s", request.method, path, status, g.get("ctx", ""), message)
    return jsonify(error=message), status


UPLOAD_TOKEN_RE = re.compile(r"(/api/v1/uploads/)[^ ?/]+")


def redact_upload_token(text: str) -> str:
    """Upload URLs are credentials until they expire: keep their tokens out of the logs."""
    return UPLOAD_TOKEN_RE.sub(r"\1…", text)
