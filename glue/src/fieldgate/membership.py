"""Which readings a batch holds: an id range in ``batches``, not a mark on every reading.

Reading ids come from ``AUTOINCREMENT``: they grow in insertion order and are never reused,
even after prune or ``delete_reading_on_zip`` removed the highest ones. A batch takes the
oldest unbatched readings by id, so the ranges of successive batches follow each other and:

- batch B holds the readings with ``B.first_id <= id <= B.last_id`` (an empty range, first
  past last, for a batch whose readings were gone when the store was migrated);
- a reading is unbatched exactly when its id is above the *watermark*, the highest
  ``last_id`` in ``batches`` (0 before the first batch).

Cutting a batch is therefore one ``INSERT`` into ``batches`` whatever its size, and the
backlog is a range count on the primary key. Any new reading (collector, poller, restore,
merge) gets an id above every id ever used, so it is unbatched until a cut takes it, and a
cut committed against a watermark another cut moved is refused
(:func:`fieldgate.batches.cut_batch` cuts again).

The rule for code that deletes ``batches`` rows: delete the readings of their ranges in the
same transaction (unless they are gone already). Then a falling watermark never uncovers a
reading that was sent; a row deleted by hand without its readings would make them count
as unbatched and be sent again, which the hub's unique key absorbs.

The same conditions in SQL, for the ``sqlite3`` shell and for tests, are :data:`UNBATCHED`
and :data:`OF_BATCH`.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from fieldgate import store

#: ``WHERE`` condition on ``readings`` of an unbatched reading.
UNBATCHED = "id > (SELECT COALESCE(MAX(last_id), 0) FROM batches)"
#: ``WHERE`` condition on ``readings`` of the readings of the batch bound as ``?``.
OF_BATCH = (
    "id BETWEEN (SELECT first_id FROM batches WHERE batch_id = ?) "
    "AND (SELECT last_id FROM batches WHERE batch_id = ?)"
)


def watermark(conn: sqlite3.Connection) -> int:
    """The highest reading id any batch took (0 before the first batch)."""
    return int(conn.execute("SELECT COALESCE(MAX(last_id), 0) FROM batches").fetchone()[0])


def count_unbatched(conn: sqlite3.Connection) -> int:
    """How many readings wait for a batch."""
    return int(
        conn.execute(f"SELECT COUNT(*) FROM readings WHERE {UNBATCHED}").fetchone()[0]  # noqa: S608
    )


def next_range(conn: sqlite3.Connection, above: int, limit: int) -> tuple[int, int] | None:
    """The first and last id of the oldest ``limit`` readings with an id above ``above`` (a
    :func:`watermark`); None when there are none. The readings are :func:`readings_of`
    that range.

    One statement, so one snapshot: the last id is the ``limit``-th id above, or the highest
    id when fewer are left (a reading added meanwhile gets a higher id). Only ids are read,
    the keys of the table's b-tree, no column of a reading: about a seventh of the cost of
    the same span with its ``MIN(ts)``/``MAX(ts)``, which the cut takes from the rows it
    reads anyway (docs/benchmarks.md).
    """
    row = conn.execute(
        "SELECT (SELECT MIN(id) FROM readings WHERE id > :above), "
        "COALESCE((SELECT id FROM readings WHERE id > :above ORDER BY id LIMIT 1 OFFSET :skip), "
        "(SELECT MAX(id) FROM readings))",
        {"above": above, "skip": max(limit, 1) - 1},
    ).fetchone()
    return None if row[0] is None else (int(row[0]), int(row[1]))


def readings_of(conn: sqlite3.Connection, first_id: int | None, last_id: int | None) -> list[Any]:
    """``(device, ts, metric, value)`` of the batch with that id range, in id order."""
    if first_id is None or last_id is None:
        return []
    return conn.execute(
        "SELECT device, ts, metric, value FROM readings WHERE id BETWEEN ? AND ? ORDER BY id",
        (first_id, last_id),
    ).fetchall()


def delete_readings_of(conn: sqlite3.Connection, first_id: int | None, last_id: int | None) -> int:
    """Delete the readings of the batch with that id range (inside the caller's
    transaction), taking them off ``device_counts``; how many there were."""
    if first_id is None or last_id is None:
        return 0
    per_device = conn.execute(
        "SELECT device, COUNT(*) FROM readings WHERE id BETWEEN ? AND ? GROUP BY device",
        (first_id, last_id),
    ).fetchall()
    store.count_gone_readings(conn, per_device)
    return conn.execute(
        "DELETE FROM readings WHERE id BETWEEN ? AND ?", (first_id, last_id)
    ).rowcount
