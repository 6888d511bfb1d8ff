"""``fieldgate hub serve``: the hub's web application under gunicorn.

gunicorn forks ``workers`` processes, each with its own storage connection; it stops
cleanly on SIGTERM. Its access log leaves out upload tokens (credentials until they
expire). Needs the ``hub`` extra (Flask, gunicorn).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from fieldgate.errors import FieldgateError
from fieldgate.hub.app import create_app
from fieldgate.hub.backends import open_storage
from fieldgate.hub.web import redact_upload_token

log = logging.getLogger("fieldgate.hub")


class RedactingLogger(Logger):
    """gunicorn's access log with upload tokens replaced by an ellipsis."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "{raw_uri}e"):
            if isinstance(atoms.get(key), str):
                atoms[key] = redact_upload_token(atoms[key])
        return atoms


def check_bind(host: str, port: int) -> None:
    """Fail with one line before gunicorn starts retrying a port that is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise FieldgateError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


class HubServer(BaseApplication):  # type: ignore[misc]
    """gunicorn running :func:`fieldgate.hub.app.create_app` with fieldgate's settings."""

    def __init__(self, db: str, bind: str, workers: int, app_options: dict[str, Any]) -> None:
        self.db = db
        self.options: dict[str, Any] = {
            "bind": bind,
            "workers": workers,
            "worker_class": "sync",
            "timeout": 300,
            "graceful_timeout": 8,
            "accesslog": "-",
            "logger_class": RedactingLogger,
            "errorlog": "-",
            "loglevel": "info",
            "proc_name": "fieldgate-hub",
            # several hubs may run on one machine (tests): no shared control socket
            "control_socket_disable": True,
        }
        self.app_options = app_options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.db, **self.app_options)


def serve(
    db: str,
    host: str,
    port: int,
    *,
    workers: int = 2,
    upload_ttl_secs: float = 3600,
    max_upload_bytes: int = 256 * 1024 * 1024,
) -> None:
    """Serve the hub API for the database ``db`` on ``host:port`` until SIGTERM."""
    if workers < 1:
        raise FieldgateError("--workers must be at least 1")
    db = str(Path(db).resolve())
    open_storage(db).close()  # create or migrate once, before the workers fork
    check_bind(host, port)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = {"upload_ttl_secs": upload_ttl_secs, "max_upload_bytes": max_upload_bytes}
    log.info("hub serving %s on %s with %d workers", db, bind, workers)
    HubServer(db, bind, workers, options).run()
