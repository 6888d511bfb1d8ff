"""What the gateway page shows, read from the store on a read-only connection.

Every query walks the store's unique index over ``(device, ts, metric)``; none scans the
readings table, so pages stay fast on a store of millions of rows (measured in
docs/gateway-page.md):

- the devices: a skip-scan of the index (one probe per device) with each device's last ts;
- a device's latest readings: the latest value of each metric among the device's last
  :data:`LATEST_WINDOW_ROWS` readings (a metric silent for longer is not "latest");
- a device's day: the 24 hours up to its last reading, raw or averaged over buckets.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fieldgate import store
from fieldgate.config import Config

DAY_MS = 86_400_000
#: How far back (in readings of one device) the latest value of each metric is looked for.
LATEST_WINDOW_ROWS = 1000

#: Every device with its last reading's ts: a recursive skip-scan of the unique index
#: (``MIN(device) … WHERE device > ?`` is one index probe per device).
DEVICES_SQL = """
WITH RECURSIVE d(device) AS (
    SELECT MIN(device) FROM readings
    UNION ALL
    SELECT (SELECT MIN(device) FROM readings WHERE device > d.device) FROM d
    WHERE d.device IS NOT NULL
)
SELECT device, (SELECT MAX(ts) FROM readings r WHERE r.device = d.device)
FROM d WHERE device IS NOT NULL
"""

#: The latest value of each metric among a device's last readings (SQLite takes the bare
#: columns of a MAX() aggregate from the row holding the maximum).
LATEST_SQL = """
SELECT metric, MAX(ts), value FROM (
    SELECT metric, ts, value FROM readings WHERE device = ? ORDER BY ts DESC LIMIT ?
) GROUP BY metric ORDER BY metric
"""

RAW_SQL = """
SELECT metric, ts, value FROM readings WHERE device = ? AND ts > ? AND ts <= ?
ORDER BY metric, ts
"""

COUNT_SQL = """
SELECT MAX(n) FROM (
    SELECT COUNT(*) AS n FROM readings WHERE device = ? AND ts > ? AND ts <= ? GROUP BY metric
)
"""

BUCKETS_SQL = """
SELECT metric, (ts / ?) * ? AS bucket, MIN(value), MAX(value), AVG(value), COUNT(*)
FROM readings WHERE device = ? AND ts > ? AND ts <= ?
GROUP BY metric, bucket ORDER BY metric, bucket
"""


def open_readonly(cfg: Config) -> sqlite3.Connection | None:
    """A read-only (``query_only``) connection to the store, or None before it exists.

    In WAL mode a reader never blocks the collector's commits, nor they it.
    """
    path = Path(cfg.store.path)
    if not path.exists():
        return None
    return store.connect(path, busy_timeout_ms=cfg.store.busy_timeout_ms, readonly=True)


@dataclass(frozen=True)
class DeviceLatest:
    """One device's latest readings: ``(metric, ts, value)`` per metric."""

    device: str
    alias: str | None
    last_ts: int
    metrics: list[tuple[str, int, float]]


@dataclass(frozen=True)
class Latest:
    """The latest-readings page: the devices shown, and how many inactive ones are not."""

    devices: list[DeviceLatest]
    hidden: int
    hide_inactive_after_days: float
    now: int


def devices(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """Every device in the store with the ts of its last reading, by name."""
    return [(d, ts) for d, ts in conn.execute(DEVICES_SQL)]


def latest(
    conn: sqlite3.Connection, cfg: Config, *, show_all: bool = False, now: int | None = None
) -> Latest:
    """The latest reading of every device active within ``web.hide_inactive_after_days``
    (of every device with ``show_all``), most recently heard first."""
    now = store.now_ms() if now is None else now
    days = cfg.web.hide_inactive_after_days
    cutoff = now - round(days * DAY_MS)
    shown: list[DeviceLatest] = []
    hidden = 0
    for device, last_ts in devices(conn):
        if last_ts < cutoff and not show_all:
            hidden += 1
            continue
        rows = conn.execute(LATEST_SQL, (device, LATEST_WINDOW_ROWS)).fetchall()
        shown.append(DeviceLatest(device, alias_of(cfg, device), last_ts, rows))
    shown.sort(key=lambda d: (-d.last_ts, d.device))
    return Latest(shown, hidden, days, now)


def alias_of(cfg: Config, device: str) -> str | None:
    dev = cfg.devices.get(device)
    return dev.alias if dev else None


@dataclass(frozen=True)
class DeviceDay:
    """A device's readings in ``(start, end]``: per metric ``(ts, value)`` pairs, or with
    ``every`` (seconds) ``(bucket start, min, max, mean, count)`` per bucket."""

    device: str
    alias: str | None
    start: int
    end: int
    every: int | None
    metrics: dict[str, list[tuple]]


def last_ts(conn: sqlite3.Connection, device: str) -> int | None:
    return conn.execute("SELECT MAX(ts) FROM readings WHERE device = ?", (device,)).fetchone()[0]


def device_day(
    conn: sqlite3.Connection, cfg: Config, device: str, *, every: int | None = None
) -> DeviceDay | None:
    """The 24 hours up to the device's last reading (None for a device with no reading):
    the day that matters for an active device, and still something to see for a silent one.
    """
    end = last_ts(conn, device)
    if end is None:
        return None
    start = end - DAY_MS
    metrics: dict[str, list[tuple]] = {}
    if every is None:
        for metric, ts, value in conn.execute(RAW_SQL, (device, start, end)):
            metrics.setdefault(metric, []).append((ts, value))
    else:
        width = every * 1000
        for metric, *bucket in conn.execute(BUCKETS_SQL, (width, width, device, start, end)):
            metrics.setdefault(metric, []).append(tuple(bucket))
    return DeviceDay(device, alias_of(cfg, device), start, end, every, metrics)


def chart_every(conn: sqlite3.Connection, device: str, max_points: int) -> int | None:
    """The bucket width (seconds) that keeps every metric of the device's day within
    ``max_points`` points, or None when the raw readings fit."""
    end = last_ts(conn, device)
    if end is None:
        return None
    most = conn.execute(COUNT_SQL, (device, end - DAY_MS, end)).fetchone()[0] or 0
    if most <= max_points:
        return None
    return max(1, math.ceil(DAY_MS / 1000 / (max_points - 1)))  # aligned buckets: one more
