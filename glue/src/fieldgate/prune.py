"""``fieldgate prune``: keep a gateway's disk use bounded without losing a reading.

What goes, for a cutoff of now - ``store.retention_days``:

- the readings of batches the hub stored (state ``uploaded``, not PASS mode) more than the
  retention ago, their batch files (in ``upload.uploaded_dir``, or in ``pending_dir`` where
  a crash left one after the mark) and then their ``batches`` rows: the hub has them, and
  the batch sequence lives in ``meta``, so no id is ever reused;
- ``rejected`` messages received and ``events`` recorded before the cutoff.

What never goes: unbatched readings, pending or lost batches, and the readings and files of
batches passed in PASS mode (no hub has them; a batch cut in LIVE or TEST mode and passed
after a switch to PASS is recorded as PASS when it is passed). With ``delete_reading_on_zip``
the batch file is a batch's only copy until the hub stored it: it is deleted only on the
same terms.

One transaction per batch (and per chunk of old rows), so the collector is never blocked
for long. SQLite does not shrink the file on DELETE: the freed pages go on the free list and
new readings reuse them, so a store pruned daily stops growing once it holds a retention's
worth of readings. The report says how much is free inside the file (``freelist_count``
times ``page_size``); prune does not VACUUM, which would need a second copy of the store on
a disk that may be nearly full and would block the collector while it runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fieldgate import membership, store
from fieldgate.config import Config

log = logging.getLogger("fieldgate.prune")

DAY_MS = 86_400_000

#: Old ``rejected``/``events`` rows are deleted this many at a time (one transaction each).
CHUNK_ROWS = 5000


@dataclass(frozen=True)
class PruneResult:
    readings: int
    batches: int
    files: int
    cutoff_ms: int
    free_bytes: int
    rejected: int = 0
    events: int = 0


def free_bytes(conn: sqlite3.Connection) -> int:
    """Bytes on the store file's free list (reused before the file grows)."""
    pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(pages) * int(size)


def prune(conn: sqlite3.Connection, cfg: Config, *, now_ms: int | None = None) -> PruneResult:
    """Delete what the hub has had for longer than the retention, and old diagnostics."""
    now = store.now_ms() if now_ms is None else now_ms
    cutoff = now - cfg.store.retention_days * DAY_MS
    old = conn.execute(
        "SELECT batch_id, file, first_id, last_id FROM batches WHERE state = 'uploaded' "
        "AND mode != 'PASS' AND uploaded_at < ? ORDER BY batch_id",
        (cutoff,),
    ).fetchall()
    deleted = 0
    files = 0
    dirs = (Path(cfg.upload.uploaded_dir), Path(cfg.upload.pending_dir))
    for batch_id, file, first_id, last_id in old:
        # the file first: a crash before the rows go leaves a row whose file is gone (the
        # next prune finishes it), never a file nobody would delete
        for directory in dirs if file else ():
            with contextlib.suppress(FileNotFoundError):
                (directory / file).unlink()
                files += 1
        with store.transaction(conn):
            # the row and the readings of its id range go together (fieldgate.membership)
            if conn.execute(
                "DELETE FROM batches WHERE batch_id = ? AND state = 'uploaded' AND mode != 'PASS'",
                (batch_id,),
            ).rowcount:
                deleted += membership.delete_readings_of(conn, first_id, last_id)
    rejected = _delete_older(conn, "rejected", "received_at", cutoff)
    events = _delete_older(conn, "events", "at", cutoff)
    if old or rejected or events:
        with store.transaction(conn):
            store.add_event(
                conn,
                "prune",
                f"pruned {deleted} readings of {len(old)} batches uploaded before "
                f"{day_text(cutoff)}, {rejected} rejected messages and {events} events",
            )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return PruneResult(deleted, len(old), files, cutoff, free_bytes(conn), rejected, events)


def _delete_older(conn: sqlite3.Connection, table: str, column: str, cutoff: int) -> int:
    """Delete the rows of ``table`` with ``column`` before ``cutoff``, a chunk at a time."""
    total = 0
    chunk = f"SELECT id FROM {table} WHERE {column} < ? ORDER BY id LIMIT ?"  # noqa: S608 (constant names)
    while True:
        with store.transaction(conn):
            if table == "rejected":  # off status's counters, in the same transaction
                store.count_gone_rejected(
                    conn,
                    conn.execute(
                        f"SELECT reason, COUNT(*) FROM rejected WHERE id IN ({chunk}) "  # noqa: S608 (a constant)
                        "GROUP BY reason",
                        (cutoff, CHUNK_ROWS),
                    ).fetchall(),
                )
            n = conn.execute(
                f"DELETE FROM {table} WHERE id IN ({chunk})",  # noqa: S608 (constant names)
                (cutoff, CHUNK_ROWS),
            ).rowcount
        total += n
        if n < CHUNK_ROWS:
            return total


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
