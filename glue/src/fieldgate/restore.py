"""Bring an exported database back: validate it, then load its readings into a store.

``fieldgate restore FILE.db --as-site SERIAL`` makes this gateway's store site SERIAL's and
loads the file's readings not yet batched, so the uploader sends them; ``--merge`` adds the
file's readings to the current store. The unique key (device, ts, metric) keeps every
reading single, however often a file is restored. ``fieldgate hub import`` uses the same
validation (:func:`fieldgate.exportdb.inspect_export`).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fieldgate import membership, store
from fieldgate.config import Config
from fieldgate.errors import FieldgateError
from fieldgate.exportdb import ExportInfo, inspect_export, readable_copy

log = logging.getLogger("fieldgate.restore")


@dataclass(frozen=True)
class RestoreResult:
    info: ExportInfo
    site: str
    new: int
    present: int


def _unuploaded(conn: sqlite3.Connection) -> int:
    unbatched = membership.count_unbatched(conn)
    pending = conn.execute(
        "SELECT COALESCE(SUM(rows), 0) FROM batches WHERE state != 'uploaded'"
    ).fetchone()[0]
    return int(unbatched) + int(pending)


def _load(conn: sqlite3.Connection, db: Path, source: str) -> int:
    """INSERT OR IGNORE every reading of ``db`` (unbatched) in one transaction."""
    conn.execute("ATTACH DATABASE ? AS src", (store.immutable_uri(db),))
    try:
        with store.transaction(conn):
            before = conn.total_changes
            conn.execute(
                "INSERT OR IGNORE INTO readings (device, ts, metric, value, received_at, source) "
                "SELECT device, ts, metric, value, received_at, ? FROM src.readings ORDER BY id",
                (source,),
            )
            new = conn.total_changes - before
            if new:
                store.count_new_readings(conn, new)
            store.add_event(conn, "restore", f"{new} new readings from {db.name}")
    finally:
        conn.execute("DETACH DATABASE src")
    return new


def _open_for_restore(cfg: Config) -> sqlite3.Connection:
    return store.open_store(cfg.store.path, busy_timeout_ms=cfg.store.busy_timeout_ms)


def restore_as_site(
    cfg: Config, file: str | Path, serial: str, *, force: bool = False
) -> RestoreResult:
    """Load an export into this gateway's store as site ``serial`` (readings unbatched)."""
    if cfg.site.serial != serial:
        raise FieldgateError(
            f"the configuration ({cfg.path}) says site.serial is {cfg.site.serial}; set it to "
            f"{serial} first (playbooks/restore.yml does this) so the gateway collects and "
            f"uploads as {serial}"
        )
    info = inspect_export(file)
    with readable_copy(info) as db:
        conn = _open_for_restore(cfg)
        try:
            current = store.get_meta(conn, "site_serial")
            count = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
            if current not in (None, serial) and count:
                raise FieldgateError(
                    f"store {cfg.store.path} holds {count} readings of site {current}; restoring "
                    f"as site {serial} would mix them: stop the glue and set that store aside "
                    "first (playbooks/restore.yml does both), or use --merge"
                )
            waiting = _unuploaded(conn)
            if waiting and not force:
                raise FieldgateError(
                    f"store {cfg.store.path} holds {waiting} readings not yet uploaded; let "
                    "'fieldgate upload --once' deliver them first, or pass --force to restore "
                    "anyway"
                )
            store.set_meta(conn, "site_serial", serial)
            new = _load(conn, db, f"restore:{info.path.name}")
        finally:
            conn.close()
    return RestoreResult(info, serial, new, info.readings - new)


def restore_merge(cfg: Config, file: str | Path) -> RestoreResult:
    """Add an export's readings to the current store; readings already present stay single."""
    info = inspect_export(file)
    with readable_copy(info) as db:
        conn = _open_for_restore(cfg)
        try:
            current = store.get_meta(conn, "site_serial")
            if current is None:
                store.set_meta(conn, "site_serial", cfg.site.serial)
            elif current != cfg.site.serial:
                raise FieldgateError(
                    f"store {cfg.store.path} belongs to site {current}, but the configuration "
                    f"says site.serial is {cfg.site.serial}; fix the configuration first"
                )
            new = _load(conn, db, f"restore:{info.path.name}")
        finally:
            conn.close()
    return RestoreResult(info, cfg.site.serial, new, info.readings - new)
