"""Micro-benchmark: the hub's storage of one million readings, without parsing or HTTP.

The readings of ``bench/upload/run.py`` (50 devices x 4 metrics, one a minute) are handed
over as parsed columns (:class:`fieldgate.batchfile.Columns`, 25,000 readings a chunk,
batches of 50,000) to each layout, in a fresh SQLite file with the hub's pragmas (WAL,
``synchronous=FULL``, 64 MiB cache), and the process's CPU seconds are printed per million
readings, alternating the layouts ``--passes`` times:

- ``hub``: the hub's own :meth:`SqliteHubStorage.ingest` (series + ``samples`` keyed
  ``(series, ts)`` WITHOUT ROWID, staged in a temporary table, rollups and series upkeep);
- ``blocks``: a prototype of readings stored per series in blocks, one row per series and
  batch (``ts`` and ``value`` as packed arrays), with the same upkeep of series counts and
  rollups, and a check that each block starts after its series' last reading. Only the
  ingest's common path (each block starts after its series' last reading held) exists
  here; the read API, retention, the ``readings`` view and PostgreSQL do not. It says
  what such a layout could save, nothing more;
- ``json``: the same blocks with each block's readings as one JSON text ``[[ts, value],
  …]``, so that a view over ``json_each`` gives plain SQL the contract's ``readings``
  columns; the bench reads every reading back through it and compares them exactly.

The budget for the hub (issue 17: uploader + hub <= 2x the baseline's CPU) is printed
beside them: 2x the baseline's 1.7-2.3 CPU-s less the uploader's 2.0-2.3, the hub's parse
(~1.0) and its start (~0.4). Run from the repository root:

    .venv/bin/python bench/upload/hub_sql.py [--rows N] [--batch-rows N] [--passes N]
"""

from __future__ import annotations

import argparse
import bisect
import fcntl
import json
import operator
import os
import sqlite3
import tempfile
import time
from array import array
from pathlib import Path

from fieldgate.batchfile import Columns
from fieldgate.hub.sqlite_storage import SqliteHubStorage

SERIAL = "GW-BENCH"
CHUNK = 25_000
ROLLUP_MS = 600_000


def batches(rows: int, batch_rows: int) -> list[list[Columns]]:
    """The readings of bench/upload/run.py as the hub's parser hands them over."""
    devices = [f"TH-{i:03d}" for i in range(50)]
    metrics = ["temperature", "humidity", "pressure", "battery"]
    per_ts = len(devices) * len(metrics)
    t0 = 1_767_225_600_000
    out: list[list[Columns]] = []
    for start in range(0, rows, batch_rows):
        chunks = []
        for lo in range(start, min(rows, start + batch_rows), CHUNK):
            idx = range(lo, min(rows, start + batch_rows, lo + CHUNK))
            chunks.append(
                Columns(
                    [devices[(i % per_ts) // len(metrics)] for i in idx],
                    [t0 + (i // per_ts) * 60_000 for i in idx],
                    [metrics[i % len(metrics)] for i in idx],
                    [round(20 + (i % 997) * 0.013, 3) for i in idx],
                )
            )
        out.append(chunks)
    return out


def run_hub(path: Path, data: list[list[Columns]]) -> float:
    st = SqliteHubStorage(path)
    cpu = time.process_time()
    for n, chunks in enumerate(data):
        st.ingest(SERIAL, f"{n:08d}", iter(chunks), manifest={})
    cpu = time.process_time() - cpu
    st.close()
    return cpu


BLOCKS_SCHEMA = """
CREATE TABLE series (
    id INTEGER PRIMARY KEY, serial TEXT NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL,
    first_ts INTEGER, last_ts INTEGER, count INTEGER NOT NULL DEFAULT 0,
    UNIQUE (serial, device, metric)
);
CREATE TABLE batches (seq INTEGER PRIMARY KEY, serial TEXT NOT NULL, batch_id TEXT NOT NULL,
    rows INTEGER NOT NULL, UNIQUE (serial, batch_id));
-- a rowid table: a block is ~4 KiB, too large for a WITHOUT ROWID b-tree's cells
CREATE TABLE blocks (
    series   INTEGER NOT NULL,
    first_ts INTEGER NOT NULL,
    last_ts  INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    batch    INTEGER NOT NULL,
    ts       BLOB    NOT NULL,                  -- array('q'), ascending, no repeats; or JSON
    value    BLOB    NOT NULL                   -- array('d'); or empty
);
CREATE UNIQUE INDEX blocks_key ON blocks (series, first_ts);
CREATE TABLE rollups (series INTEGER NOT NULL, bucket INTEGER NOT NULL, min REAL NOT NULL,
    max REAL NOT NULL, sum REAL NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (series, bucket)) WITHOUT ROWID;
"""
ROLLUP_ADD = (
    "INSERT INTO rollups (series, bucket, min, max, sum, count) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (series, bucket) DO UPDATE SET min = min(rollups.min, excluded.min), "
    "max = max(rollups.max, excluded.max), sum = rollups.sum + excluded.sum, "
    "count = rollups.count + excluded.count"
)


def _blocks_ingest(
    conn: sqlite3.Connection,
    lock: int,
    ids: dict[tuple[str, str], int],
    n: int,
    chunks: list,
    enc: str,
) -> None:
    # before the lock: the batch's readings grouped per series (a stable sort of the row
    # numbers by series id: a series' readings keep their order, which is time order as a
    # gateway sends them; a series out of order is sorted alone), blocks and rollups built
    sids: list[int] = []
    ts: list[int] = []
    values: list[float] = []
    for cols in chunks:
        pairs = zip(cols.devices, cols.metrics, strict=True)
        got = [*map(ids.get, pairs)]
        if None in got:
            for pair in dict.fromkeys(zip(cols.devices, cols.metrics, strict=True)):
                if pair not in ids:
                    conn.execute(
                        "INSERT INTO series (serial, device, metric) VALUES (?, ?, ?)",
                        (SERIAL, *pair),
                    )
                    ids[pair] = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            got = [*map(ids.__getitem__, zip(cols.devices, cols.metrics, strict=True))]
        sids += got
        ts += cols.ts
        values += cols.values
    order = sorted(range(len(sids)), key=sids.__getitem__)
    s_sorted = [*map(sids.__getitem__, order)]
    t_sorted = [*map(ts.__getitem__, order)]
    v_sorted = [*map(values.__getitem__, order)]
    del order, sids, ts, values
    blocks = []
    rollups = []
    upkeep = []
    lo = 0
    total = len(s_sorted)
    while lo < total:
        sid = s_sorted[lo]
        hi = bisect.bisect_right(s_sorted, sid, lo)
        t = t_sorted[lo:hi]
        v = v_sorted[lo:hi]
        if not all(map(operator.lt, t, t[1:])):
            pairs = sorted(zip(t, v, strict=True))
            t = [p[0] for p in pairs]
            v = [p[1] for p in pairs]
            if not all(map(operator.lt, t, t[1:])):
                raise ValueError(
                    "a reading twice in one batch: the slow path is not built"
                )
        if enc == "json":  # one text [[ts, value], …]: SQL's json_each reads it
            blocks.append((sid, t[0], t[-1], len(t), json.dumps([*zip(t, v)]), b""))
        else:
            blocks.append(
                (
                    sid,
                    t[0],
                    t[-1],
                    len(t),
                    array("q", t).tobytes(),
                    array("d", v).tobytes(),
                )
            )
        upkeep.append((len(t), t[0], t[0], t[-1], t[-1], sid))
        a = 0
        while a < len(t):
            bucket = t[a] // ROLLUP_MS * ROLLUP_MS
            b = bisect.bisect_left(t, bucket + ROLLUP_MS, a)
            part = v[a:b]
            rollups.append((sid, bucket, min(part), max(part), sum(part), b - a))
            a = b
        lo = hi
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        conn.execute("BEGIN IMMEDIATE")
        seq = conn.execute(
            "INSERT INTO batches (serial, batch_id, rows) VALUES (?, ?, ?) RETURNING seq",
            (SERIAL, f"{n:08d}", total),
        ).fetchone()[0]
        # a block overlapping one held is the slow path; a series' last_ts is exact, so the
        # common case (every block starts after its series' last reading) is one query
        last = dict(
            conn.execute("SELECT id, last_ts FROM series WHERE serial = ?", (SERIAL,))
        )
        for sid, first, *_ in blocks:
            held = last.get(sid)
            if held is not None and held >= first:
                raise ValueError(
                    "a block starts before its series' last reading held: slow path"
                )
        conn.executemany(
            f"INSERT INTO blocks (series, first_ts, last_ts, n, batch, ts, value) "
            f"VALUES (?, ?, ?, ?, {int(seq)}, ?, ?)",
            blocks,
        )
        conn.executemany(ROLLUP_ADD, rollups)
        conn.executemany(
            "UPDATE series SET count = count + ?, first_ts = min(COALESCE(first_ts, ?), ?), "
            "last_ts = max(COALESCE(last_ts, ?), ?) WHERE id = ?",
            upkeep,
        )
        conn.execute("COMMIT")
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


#: The contract's readings over JSON blocks: what outside tests and tools SELECT.
JSON_VIEW = """
CREATE VIEW readings AS
    SELECT s.serial, s.device, json_extract(p.value, '$[0]') AS ts, s.metric,
        json_extract(p.value, '$[1]') AS value, b.batch_id
    FROM blocks k JOIN series s ON s.id = k.series JOIN batches b ON b.seq = k.batch,
        json_each(k.ts) p
"""


def run_blocks(path: Path, data: list[list[Columns]], enc: str = "packed") -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA cache_size = -65536")
    conn.executescript(BLOCKS_SCHEMA)
    lock = os.open(f"{path}-ingest", os.O_RDONLY | os.O_CREAT, 0o644)
    ids: dict[tuple[str, str], int] = {}
    cpu = time.process_time()
    for n, chunks in enumerate(data):
        _blocks_ingest(conn, lock, ids, n, chunks, enc)
    cpu = time.process_time() - cpu
    held = conn.execute("SELECT SUM(n) FROM blocks").fetchone()[0]
    if enc == "json":
        conn.execute(JSON_VIEW)
        _check_view(conn, data)
    os.close(lock)
    conn.close()
    if held != sum(len(c.ts) for chunks in data for c in chunks):
        raise SystemExit(f"bench: blocks hold {held} readings")
    return cpu


def run_json(path: Path, data: list[list[Columns]]) -> float:
    return run_blocks(path, data, "json")


def _check_view(conn: sqlite3.Connection, data: list[list[Columns]]) -> None:
    """The view holds every reading exactly (values compared as Python floats)."""
    cpu = time.process_time()
    got = conn.execute("SELECT device, ts, metric, value FROM readings").fetchall()
    cpu = time.process_time() - cpu
    want = [
        r
        for chunks in data
        for c in chunks
        for r in zip(c.devices, c.ts, c.metrics, c.values)
    ]
    if sorted(got) != sorted(want):
        raise SystemExit(
            "bench: the JSON blocks' readings view differs from what was stored"
        )
    print(
        f"  the readings view of the JSON blocks: {len(got)} rows, exact, {cpu:.2f} CPU-s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args()
    data = batches(args.rows, args.batch_rows)
    per_m = 1_000_000 / args.rows
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    layouts = (("hub", run_hub), ("blocks", run_blocks), ("json", run_json))
    got: dict[str, list[float]] = {name: [] for name, _ in layouts}
    with tempfile.TemporaryDirectory(prefix="fg-hubsql-") as tmp:
        for p in range(args.passes):
            for name, fn in layouts:
                cpu = fn(Path(tmp) / f"{name}-{p}.db", data) * per_m
                got[name].append(cpu)
                print(f"pass {p + 1} {name:6s}: {cpu:.2f} CPU-s per million readings")
    hub, blocks, js = (min(got[k]) for k in ("hub", "blocks", "json"))
    print(
        f"best: hub {hub:.2f}, blocks {blocks:.2f} ({blocks / hub:.2f}x), "
        f"json blocks {js:.2f} ({js / hub:.2f}x) CPU-s per million"
    )
    print(
        "the hub's storage budget (issue 17): about 0.0-0.9 CPU-s per million readings"
    )
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
