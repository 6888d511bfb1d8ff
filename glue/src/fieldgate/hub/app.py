"""The hub's web application: a Flask factory that mounts the hub's blueprints.

- :mod:`fieldgate.hub.uploads`: what gateways call (register, offer a batch, upload it);
- :mod:`fieldgate.hub.fleet`: health (open) and the gateway summaries;
- :mod:`fieldgate.hub.query`: the read API (readings, buckets, extent);
- :mod:`fieldgate.hub.account`: log in and out (sessions); :mod:`fieldgate.hub.openapi`;
- :mod:`fieldgate.hub.metrics`: ``/metrics`` for Prometheus;
- :mod:`fieldgate.hub.pages`: the web pages (login, the fleet, a gateway) and their assets.

Who the caller is and what they may see is decided in one place, :mod:`fieldgate.hub.auth`.
Every error is JSON ``{"error": "<one sentence>"}`` (:mod:`fieldgate.hub.web`) and is logged
with the gateway and batch; a database that is busy or gone answers 503 (clients retry).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from fieldgate.errors import FieldgateError
from fieldgate.hub import auth
from fieldgate.hub.account import account
from fieldgate.hub.backends import is_transient, open_storage
from fieldgate.hub.fleet import fleet, health_bp
from fieldgate.hub.metrics import metrics
from fieldgate.hub.openapi import docs
from fieldgate.hub.pages import assets, pages
from fieldgate.hub.query import query
from fieldgate.hub.storage import HubStorage
from fieldgate.hub.uploads import uploads
from fieldgate.hub.web import (
    EXTENSION,
    MAX_JSON_BYTES,
    ApiError,
    ClientTooSlow,
    HubSettings,
    error_response,
    settings,
)

log = logging.getLogger("fieldgate.hub")


def create_app(
    db: str,
    *,
    upload_ttl_secs: float = 3600,
    max_upload_bytes: int = 256 * 1024 * 1024,
    password_file: str | Path | None = None,
    trusted_proxies: int = 0,
    storage_factory: Callable[[], HubStorage] | None = None,
) -> Flask:
    """The hub application over the database ``db`` (a SQLite path or a PostgreSQL URL).

    Each worker thread opens its own storage on first use (after the fork).
    ``trusted_proxies`` reverse proxies in front are believed about the client address,
    scheme and host (X-Forwarded-For/-Proto/-Host).
    """
    app = Flask("fieldgate.hub", static_folder=None)  # the pages bring their own (assets)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = HubSettings(
        factory=storage_factory
        or (lambda: open_storage(db, create=False, password_file=password_file)),
        upload_ttl_secs=upload_ttl_secs,
        max_upload_bytes=max_upload_bytes,
    )
    auth.install(app)
    app.before_request(_refuse_nul)
    app.before_request(_limit_body)
    for bp in (uploads, health_bp, fleet, query, account, docs, metrics, pages, assets):
        app.register_blueprint(bp)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(ClientTooSlow, _too_slow)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal)
    if trusted_proxies:
        n = trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
    return app


def _refuse_nul() -> None:
    """No name the hub knows contains NUL (PostgreSQL text cannot hold one): refuse it
    in the path and the parameters before anything looks it up."""
    if "\x00" in request.path or any("\x00" in k + v for k, v in request.args.items(multi=True)):
        raise ApiError(400, "the request contains a NUL character")


def _limit_body() -> None:
    """Only a batch upload may be large (``--max-upload-mb``): every other request body is
    read up to :data:`~fieldgate.hub.web.MAX_JSON_BYTES` (413 past it)."""
    if request.endpoint != "uploads.put_batch":
        request.max_content_length = MAX_JSON_BYTES


def _api_error(exc: ApiError) -> tuple[Response, int]:
    return error_response(exc.status, exc.message, exc.headers)


def _too_slow(exc: ClientTooSlow) -> tuple[Response, int]:
    return error_response(408, f"this client {exc.strerror}; nothing was stored")


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    status = exc.code or 500
    messages = {
        404: "no such endpoint",
        405: f"method {request.method} is not allowed here",
        413: f"the request body is larger than this hub accepts ({request.max_content_length} "
        "bytes)",
    }
    allow = {k: v for k, v in exc.get_headers() if k == "Allow"}  # 405 names the methods
    return error_response(status, messages.get(status, exc.description or exc.name), allow)


def _internal(exc: Exception) -> tuple[Response, int]:
    if isinstance(exc, FieldgateError):  # this worker cannot open its storage
        settings().discard_storage()
        log.error("database unavailable on %s %s: %s", request.method, request.path, exc)
        return error_response(503, "the hub's database is unavailable; try again")
    if is_transient(exc):
        settings().discard_storage()  # a new connection for the next request
        log.warning("database unavailable on %s %s: %s", request.method, request.path, exc)
        return error_response(503, "the hub's database is busy or unavailable; try again")
    log.exception("internal error on %s %s", request.method, request.path)
    return jsonify(error=f"internal hub error: {type(exc).__name__}"), 500
