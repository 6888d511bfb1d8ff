"""``fieldgate hub serve | pin | import``: run the reference hub, issue PINs, import exports."""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldgate.errors import FieldgateError
from fieldgate.exportdb import inspect_export
from fieldgate.hub.backends import open_storage
from fieldgate.hub.imports import import_export
from fieldgate.names import is_name


def serve(args: argparse.Namespace) -> int:
    """``fieldgate hub serve --db PATH --listen HOST:PORT``: the API under gunicorn."""
    try:
        from fieldgate.hub import server
    except ModuleNotFoundError as exc:
        if exc.name not in ("flask", "gunicorn", "werkzeug"):
            raise
        raise FieldgateError(
            "'fieldgate hub serve' needs the hub extra (Flask, gunicorn): "
            "pip install 'fieldgate[hub]'"
        ) from None
    host, port = args.listen
    server.serve(
        args.db,
        host,
        port,
        workers=args.workers,
        upload_ttl_secs=float(args.upload_ttl_secs),
        max_upload_bytes=int(float(args.max_upload_mb) * 1024 * 1024),
    )
    return 0


def pin(args: argparse.Namespace) -> int:
    """``fieldgate hub pin --db PATH --serial SERIAL``: print a one-time registration PIN."""
    if not is_name(args.serial):
        raise FieldgateError(f"{args.serial!r} is not a valid gateway serial")
    st = open_storage(args.db)
    try:
        new_pin = st.create_pin(args.serial, int(float(args.valid_hours) * 3600))
    finally:
        st.close()
    print(new_pin)
    return 0


def import_(args: argparse.Namespace) -> int:
    """``fieldgate hub import --db PATH FILE.db``: ingest an exported gateway database."""
    info = inspect_export(args.file)  # before the hub database is opened (or created)
    st = open_storage(args.db)
    try:
        new = import_export(st, info)
    finally:
        st.close()
    name = Path(args.file).name
    print(f"imported {name} for {info.site_serial}: {info.readings} readings, {new} new")
    return 0
