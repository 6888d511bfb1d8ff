"""Exported databases: validate one, and read its readings (``restore`` and ``hub import``).

An export (USB drive, ``fieldgate export``, ``playbooks/backup.yml``) is a snapshot of a
gateway store (docs/contract.md §5, §7): plain SQLite in rollback-journal mode, with a
``export-*.sha256`` file beside it. This module is the one reader of that format; it opens
the file immutable, so nothing is ever created beside it (not even on read-only media).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fieldgate import store
from fieldgate.errors import FieldgateError
from fieldgate.fsutil import sha256_file

SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class ExportInfo:
    """What validation learned about an exported database."""

    path: Path
    site_serial: str
    schema_version: int
    readings: int
    first_ts: int | None
    last_ts: int | None
    checksum_file: Path | None


def verify_checksum(path: Path) -> Path | None:
    """Verify FILE against a sha256sum-format file beside it that lists it, if there is one.

    Returns the checksum file used, or None when none beside the file mentions it.
    """
    for candidate in sorted(path.parent.glob("*.sha256")):
        try:
            lines = candidate.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            digest, _, name = line.strip().partition(" ")
            name = name.lstrip(" *")
            if name and Path(name).name == path.name and len(digest) == 64:
                if sha256_file(path) != digest.lower():
                    raise FieldgateError(
                        f"{path}: checksum mismatch against {candidate.name}: the file is "
                        "damaged or was changed; copy it again from the drive"
                    )
                return candidate
    return None


def inspect_export(path: str | Path) -> ExportInfo:
    """Validate an exported fieldgate database; FieldgateError names what is wrong.

    Checks, in order: the file exists, is SQLite, passes ``PRAGMA integrity_check``, is a
    fieldgate store with a known (or migratable) schema version and a site serial, and
    matches the checksum file beside it when there is one.
    """
    path = Path(path)
    if not path.exists():
        raise FieldgateError(f"{path} does not exist")
    if not path.is_file():
        raise FieldgateError(f"{path} is not a file")
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise FieldgateError(f"cannot read {path}: {exc.strerror}") from None
    if header != SQLITE_MAGIC:
        raise FieldgateError(f"{path} is not an SQLite database")
    checksum_file = verify_checksum(path)
    try:
        conn = store.connect(path, immutable=True)
        try:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if result != ["ok"]:
                problems = [
                    line
                    for row in result
                    for line in str(row).splitlines()
                    if line.strip() and not line.startswith("***")
                ]
                first = problems[0] if problems else "failed"
                raise FieldgateError(
                    f"{path} is damaged (integrity check: {first}; {len(problems)} problems); "
                    "use another copy"
                )
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not {"readings", "meta"} <= tables:
                raise FieldgateError(f"{path} is an SQLite database but not a fieldgate store")
            version = store.schema_version(conn)
            if version == 0:
                raise FieldgateError(f"{path} is not a fieldgate store (no schema version)")
            if version > store.SCHEMA_VERSION:
                raise FieldgateError(
                    f"{path} has schema version {version}, newer than this fieldgate supports "
                    f"({store.SCHEMA_VERSION}); upgrade fieldgate on this machine first"
                )
            site = store.get_meta(conn, "site_serial")
            if not site:
                raise FieldgateError(f"{path} is a fieldgate store without a site serial")
            count, first, last = conn.execute(
                "SELECT COUNT(*), MIN(ts), MAX(ts) FROM readings"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        detail = " ".join(str(exc).split())
        raise FieldgateError(
            f"{path} is damaged or truncated ({detail}); use another copy"
        ) from None
    return ExportInfo(path, site, version, count, first, last, checksum_file)


@contextmanager
def readable_copy(info: ExportInfo) -> Iterator[Path]:
    """A path to a database at the current schema: the file itself, or a migrated copy."""
    if info.schema_version == store.SCHEMA_VERSION:
        yield info.path
        return
    with tempfile.TemporaryDirectory(prefix="fieldgate-restore-") as tmp:
        copy = Path(tmp) / info.path.name
        shutil.copyfile(info.path, copy)
        conn = store.connect(copy)
        store.migrate(conn, str(info.path))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        yield copy


def iter_readings(db: Path, batch_size: int = 10000) -> Iterator[list[store.Reading]]:
    """The readings of a validated export, in id order, in lists of ``batch_size``."""
    conn = store.connect(db, immutable=True)
    try:
        cur = conn.execute("SELECT device, ts, metric, value FROM readings ORDER BY id")
        while rows := cur.fetchmany(batch_size):
            yield rows
    finally:
        conn.close()
