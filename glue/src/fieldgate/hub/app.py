"""The hub's web application: a Flask factory that mounts the hub's blueprints.

- :mod:`fieldgate.hub.uploads`: what gateways call (register, offer a batch, upload it);
- :mod:`fieldgate.hub.fleet`: health and the gateway summaries.

Every error is JSON ``{"error": "<one sentence>"}`` (:mod:`fieldgate.hub.web`) and is logged
with the gateway and batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from fieldgate.hub.backends import open_storage
from fieldgate.hub.fleet import fleet
from fieldgate.hub.storage import HubStorage
from fieldgate.hub.uploads import uploads
from fieldgate.hub.web import EXTENSION, ApiError, HubSettings, error_response, settings

log = logging.getLogger("fieldgate.hub")


def create_app(
    db_path: str,
    *,
    upload_ttl_secs: float = 3600,
    max_upload_bytes: int = 256 * 1024 * 1024,
    storage_factory: Callable[[], HubStorage] | None = None,
) -> Flask:
    """The hub application over the database at ``db_path``.

    Each worker process opens its own storage on first use (after the fork).
    """
    app = Flask("fieldgate.hub")
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = HubSettings(
        factory=storage_factory or (lambda: open_storage(db_path, create=False)),
        upload_ttl_secs=upload_ttl_secs,
        max_upload_bytes=max_upload_bytes,
    )
    app.register_blueprint(uploads)
    app.register_blueprint(fleet)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal)
    return app


def _api_error(exc: ApiError) -> tuple[Response, int]:
    return error_response(exc.status, exc.message)


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    status = exc.code or 500
    messages = {
        404: "no such endpoint",
        405: f"method {request.method} is not allowed here",
        413: f"the upload is larger than this hub accepts ({settings().max_upload_bytes} bytes)",
    }
    return error_response(status, messages.get(status, exc.description or exc.name))


def _internal(exc: Exception) -> tuple[Response, int]:
    log.exception("internal error on %s %s", request.method, request.path)
    return jsonify(error=f"internal hub error: {type(exc).__name__}"), 500
