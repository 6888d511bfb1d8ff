"""``fieldgate hub serve``: the hub's web application under gunicorn.

gunicorn forks ``workers`` processes of ``threads`` threads each
(:class:`fieldgate.hub.worker.HubWorker`: gunicorn's ``gthread`` worker with deadlines on
every read and write, so idle connections wait in the worker's event loop and a slow
client holds a thread for seconds, not for ever), each thread with its own storage
connection; it stops cleanly on SIGTERM. With ``retention_days`` a retention process runs
beside the workers (:mod:`fieldgate.hub.retention`). The access log leaves out upload
tokens (credentials until they expire). Needs the ``hub`` extra (Flask, gunicorn, psycopg).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from fieldgate.errors import FieldgateError
from fieldgate.hub import worker
from fieldgate.hub.app import create_app
from fieldgate.hub.backends import describe, is_postgresql, open_storage
from fieldgate.hub.web import settings_of
from fieldgate.redact import redact

log = logging.getLogger("fieldgate.hub")


class RedactingLogger(Logger):
    """gunicorn's access log with upload tokens replaced by an ellipsis."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "{raw_uri}e"):
            if isinstance(atoms.get(key), str):
                atoms[key] = redact(atoms[key])
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


def freeze_before_fork(_arbiter: Any, _worker: Any) -> None:
    """gunicorn's ``pre_fork``: the master's objects (the modules it imported, the
    application) go to the collector's permanent generation before a worker is forked, as
    :func:`gc.freeze` advises for a fork without exec. The workers' collections then never
    walk them, so they neither spend the CPU nor copy the pages they share with the master
    (docs/benchmarks.md, "The hub's start and stop")."""
    gc.freeze()


def exit_worker(_arbiter: Any, worker: Any) -> None:
    """gunicorn's ``worker_exit``, in the worker as it leaves: one that stopped cleanly
    waits for its threads (a request past the graceful timeout still finishes, as the
    interpreter's exit would wait for it), closes their storages, flushes its logs and
    leaves with :func:`os._exit`, as the forked children of :mod:`multiprocessing` do,
    instead of tearing down object by object the interpreter it forked from the master.
    Any other exit (an error, a failed boot) takes the usual way with its status."""
    exc = sys.exc_info()[1]
    if not isinstance(exc, SystemExit) or exc.code not in (0, None):
        return
    tpool = getattr(worker, "tpool", None)
    if tpool is not None:
        tpool.shutdown(wait=True)
    app = getattr(worker, "wsgi", None)
    if app is not None:
        settings_of(app).close_storages()
    leave()


def leave() -> NoReturn:
    """End a hub process whose work is done and whose resources are closed (a worker
    after :func:`exit_worker`'s steps, the master after gunicorn stopped cleanly): its logs
    and standard streams flushed, then :func:`os._exit` with status 0, without tearing the
    interpreter down object by object (about 0.02 CPU-s for the master, more for a worker
    whose pages it shares with the master; docs/benchmarks.md)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


class HubServer(BaseApplication):  # type: ignore[misc]
    """gunicorn running :func:`fieldgate.hub.app.create_app` with fieldgate's settings."""

    def __init__(
        self, db: str, bind: str, workers: int, threads: int, app_options: dict[str, Any]
    ) -> None:
        self.db = db
        self.options: dict[str, Any] = {
            "bind": bind,
            "workers": workers,
            "worker_class": "fieldgate.hub.worker.HubWorker",
            "threads": threads,
            "pre_request": worker.pre_request,
            # gthread: the master kills a worker whose event loop stalls this long (requests
            # run in the worker's threads and do not stall it)
            "timeout": 60,
            "keepalive": 5,
            "graceful_timeout": 8,
            "accesslog": "-",
            "logger_class": RedactingLogger,
            "errorlog": "-",
            "loglevel": "info",
            "proc_name": "fieldgate-hub",
            # several hubs may run on one machine (tests): no shared control socket
            "control_socket_disable": True,
            "pre_fork": freeze_before_fork,
            "worker_exit": exit_worker,
        }
        self.app_options = app_options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.db, **self.app_options)


def start_retention(db: str, days: float, password_file: str | None) -> subprocess.Popen[bytes]:
    """The retention process (it exits by itself when this process is gone)."""
    cmd = [sys.executable, "-m", "fieldgate.hub.retention", "--db", db, "--days", str(days)]
    if password_file:
        cmd += ["--db-password-file", password_file]
    return subprocess.Popen(cmd)


def serve(
    db: str,
    host: str,
    port: int,
    *,
    workers: int = 2,
    threads: int = 4,
    upload_ttl_secs: float = 3600,
    max_upload_bytes: int = 256 * 1024 * 1024,
    password_file: str | None = None,
    trusted_proxies: int = 0,
    retention_days: float | None = None,
    client_timeout: float = worker.LIMITS.read_timeout,
    min_body_rate: float = worker.LIMITS.min_body_rate,
) -> None:
    """Serve the hub API for the database ``db`` on ``host:port`` until SIGTERM."""
    if workers < 1:
        raise FieldgateError("--workers must be at least 1")
    if threads < 1:
        raise FieldgateError("--threads must be at least 1")
    if retention_days is not None and not retention_days > 0:
        raise FieldgateError("--retention-days must be more than 0")
    if trusted_proxies < 0:
        raise FieldgateError("--trusted-proxies must be 0 or more")
    if not client_timeout > 0:
        raise FieldgateError("--client-timeout must be more than 0")
    if not min_body_rate > 0:
        raise FieldgateError("--min-body-rate must be more than 0")
    worker.LIMITS.read_timeout = client_timeout
    worker.LIMITS.min_body_rate = min_body_rate
    if not is_postgresql(db):
        db = str(Path(db).resolve())
    if password_file:
        password_file = str(Path(password_file).resolve())
    check_bind(host, port)  # before a new database is created for a hub that cannot start
    # create or migrate once, before the fork; a new database is said once, here
    st = open_storage(db, password_file=password_file)
    st.close()
    if st.created:
        log.info("hub database %s did not exist: created it", describe(db))
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = {
        "upload_ttl_secs": upload_ttl_secs,
        "max_upload_bytes": max_upload_bytes,
        "password_file": password_file,
        "trusted_proxies": trusted_proxies,
    }
    log.info(
        "hub serving %s on %s with %d workers of %d threads (clients: %g s for headers, "
        "%g bytes/s for bodies)%s",
        describe(db),
        bind,
        workers,
        threads,
        client_timeout,
        min_body_rate,
        f", retention {retention_days:g} days" if retention_days else "",
    )
    retention = start_retention(db, retention_days, password_file) if retention_days else None
    try:
        HubServer(db, bind, workers, threads, options).run()
    finally:
        if retention is not None:
            retention.terminate()
            try:
                retention.wait(10)
            except subprocess.TimeoutExpired:
                retention.kill()
                retention.wait()
