"""Which storage backend a ``--db`` value names: a SQLite file path (the embedded default) or
a ``postgresql://user@host:port/dbname`` URL (docs/contract.md §11).

The web app and the ``fieldgate hub`` commands open their storage here and use only the
:class:`~fieldgate.hub.storage.HubStorage` interface. psycopg is imported only for a
PostgreSQL URL.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from fieldgate.errors import FieldgateError
from fieldgate.hub.storage import HubStorage


def is_postgresql(db: str) -> bool:
    """Whether ``db`` is a PostgreSQL URL rather than a SQLite path."""
    return db.startswith(("postgresql://", "postgres://"))


def describe(db: str) -> str:
    """``db`` as logs and messages show it (a URL without user information)."""
    if is_postgresql(db):
        from fieldgate.hub.pg_storage import describe as describe_url

        return describe_url(db)
    return db


def open_storage(
    db: str, *, create: bool = True, password_file: str | Path | None = None
) -> HubStorage:
    """The hub storage at ``db``, migrated; ``create`` makes a missing SQLite file or the
    tables of an empty PostgreSQL database. ``password_file`` holds the PostgreSQL password
    (else libpq's ``PGPASSWORD`` or ``~/.pgpass``)."""
    if is_postgresql(db):
        try:
            from fieldgate.hub.pg_storage import PgHubStorage
        except ModuleNotFoundError as exc:
            if exc.name != "psycopg":
                raise
            raise FieldgateError(
                "a postgresql:// database needs psycopg, part of the hub extra: "
                "pip install 'fieldgate[hub]'"
            ) from None
        return PgHubStorage(db, create=create, password_file=password_file)
    if password_file is not None:
        raise FieldgateError("--db-password-file is for a postgresql:// database, not a file")
    from fieldgate.hub.sqlite_storage import SqliteHubStorage

    return SqliteHubStorage(db, create=create)


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is worth retrying: a busy SQLite file, a PostgreSQL
    connection that broke, a deadlock or serialization failure it resolved."""
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    psycopg = sys.modules.get("psycopg")
    if psycopg is None:
        return False
    return isinstance(
        exc,
        (
            psycopg.OperationalError,
            psycopg.errors.DeadlockDetected,
            psycopg.errors.SerializationFailure,
        ),
    )
