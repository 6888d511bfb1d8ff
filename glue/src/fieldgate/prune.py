"""``fieldgate prune``: delete readings the hub has had for longer than the retention.

Only readings of batches in state ``uploaded`` that were sent to a hub (not PASS mode)
and uploaded more than ``store.retention_days`` ago are deleted; unbatched readings,
pending batches and PASS batches are never touched. The uploaded batch files of those
batches are deleted from ``upload.uploaded_dir`` too. The ``batches`` rows stay (they are
small and record what was sent).

SQLite does not shrink the file on DELETE: the freed pages go on the free list and new
readings reuse them. The report says how much is free inside the file (``freelist_count``
times ``page_size``); it does not VACUUM, which would need a second copy of the store on a disk
that may be nearly full and would block the collector while it runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fieldgate import store
from fieldgate.config import Config

log = logging.getLogger("fieldgate.prune")

DAY_MS = 86_400_000


@dataclass(frozen=True)
class PruneResult:
    readings: int
    batches: int
    files: int
    cutoff_ms: int
    free_bytes: int


def free_bytes(conn: sqlite3.Connection) -> int:
    """Bytes on the store file's free list (reused before the file grows)."""
    pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(pages) * int(size)


def prune(conn: sqlite3.Connection, cfg: Config, *, now_ms: int | None = None) -> PruneResult:
    """Delete readings of batches uploaded before now - retention; one transaction per batch
    so the collector is never blocked for long."""
    now = store.now_ms() if now_ms is None else now_ms
    cutoff = now - cfg.store.retention_days * DAY_MS
    old = conn.execute(
        "SELECT batch_id, file FROM batches WHERE state = 'uploaded' AND mode != 'PASS' "
        "AND uploaded_at < ? ORDER BY batch_id",
        (cutoff,),
    ).fetchall()
    deleted = 0
    touched = 0
    files = 0
    uploaded_dir = Path(cfg.upload.uploaded_dir)
    for batch_id, file in old:
        with store.transaction(conn):
            n = conn.execute(
                "DELETE FROM readings WHERE batch_id = ? AND batch_id IN "
                "(SELECT batch_id FROM batches WHERE batch_id = ? AND state = 'uploaded')",
                (batch_id, batch_id),
            ).rowcount
        if n:
            deleted += n
            touched += 1
        if file:
            with contextlib.suppress(FileNotFoundError):
                (uploaded_dir / file).unlink()
                files += 1
    if deleted:
        with store.transaction(conn):
            store.add_event(
                conn, "prune", f"pruned {deleted} readings uploaded before {day_text(cutoff)}"
            )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return PruneResult(deleted, touched, files, cutoff, free_bytes(conn))


def day_text(ms: int) -> str:
    """``2026-08-23 08:00 UTC``: the cutoff as prune reports it."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def prune_store(cfg: Config) -> PruneResult:
    """``fieldgate prune``: prune the configured store."""
    conn = store.open_store(
        cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
    )
    try:
        return prune(conn, cfg)
    finally:
        conn.close()
