"""``fieldgate hub serve | pin | import``: run the reference hub, issue PINs, import exports."""

from __future__ import annotations

import argparse
import logging
import re
import socket
from pathlib import Path
from typing import Any

from fieldgate.errors import FieldgateError
from fieldgate.exportdb import inspect_export, iter_readings, readable_copy
from fieldgate.hub.backends import open_storage
from fieldgate.names import is_name

log = logging.getLogger("fieldgate.hub")


UPLOAD_TOKEN_RE = re.compile(r"(/api/v1/uploads/)[^ ?/]+")


def redact_upload_token(text: str) -> str:
    """Upload URLs are credentials until they expire: keep their tokens out of the logs."""
    return UPLOAD_TOKEN_RE.sub(r"\1…", text)


def _redacting_logger_class() -> type:
    from gunicorn.glogging import Logger

    class RedactingLogger(Logger):
        """gunicorn's access log with upload tokens replaced by an ellipsis."""

        def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
            atoms = super().atoms(resp, req, environ, request_time)
            for key in ("r", "U", "{raw_uri}e"):
                if isinstance(atoms.get(key), str):
                    atoms[key] = redact_upload_token(atoms[key])
            return atoms

    return RedactingLogger


def _check_bind(host: str, port: int) -> None:
    """Fail with one line before gunicorn starts retrying a port that is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise FieldgateError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve_cmd(args: argparse.Namespace) -> int:
    """``fieldgate hub serve --db PATH --listen HOST:PORT``: the API under gunicorn."""
    from gunicorn.app.base import BaseApplication

    from fieldgate.hub.app import create_app

    host, port = args.listen
    if args.workers < 1:
        raise FieldgateError("--workers must be at least 1")
    db = str(Path(args.db).resolve())
    open_storage(db).close()  # create or migrate once, before the workers fork
    _check_bind(host, port)
    ttl = float(getattr(args, "upload_ttl_secs", 3600))
    max_bytes = int(float(getattr(args, "max_upload_mb", 256)) * 1024 * 1024)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    class HubServer(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": bind,
                "workers": args.workers,
                "worker_class": "sync",
                "timeout": 300,
                "graceful_timeout": 8,
                "accesslog": "-",
                "logger_class": _redacting_logger_class(),
                "errorlog": "-",
                "loglevel": "info",
                "proc_name": "fieldgate-hub",
                # several hubs may run on one machine (tests): no shared control socket
                "control_socket_disable": True,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app(db, upload_ttl_secs=ttl, max_upload_bytes=max_bytes)

    log.info("hub serving %s on %s with %d workers", db, bind, args.workers)
    HubServer().run()
    return 0


def pin_cmd(args: argparse.Namespace) -> int:
    """``fieldgate hub pin --db PATH --serial SERIAL``: print a one-time registration PIN."""
    if not is_name(args.serial):
        raise FieldgateError(f"{args.serial!r} is not a valid gateway serial")
    hours = float(getattr(args, "valid_hours", 24))
    st = open_storage(args.db)
    try:
        pin = st.create_pin(args.serial, int(hours * 3600))
    finally:
        st.close()
    print(pin)
    return 0


def import_cmd(args: argparse.Namespace) -> int:
    """``fieldgate hub import --db PATH FILE.db``: ingest an exported gateway database."""
    info = inspect_export(args.file)
    st = open_storage(args.db)
    try:
        with readable_copy(info) as db:
            rows = (r for chunk in iter_readings(db) for r in chunk)
            new = st.ingest(
                info.site_serial,
                f"import-{Path(args.file).name}",
                rows,
                manifest={"type": "import", "mode": "LIVE", "file": str(args.file)},
            )
    finally:
        st.close()
    print(
        f"imported {Path(args.file).name} for {info.site_serial}: {info.readings} readings, "
        f"{new} new"
    )
    return 0
