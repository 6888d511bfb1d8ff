"""Micro-benchmark: the hub's storage of one million readings, without parsing or HTTP.

The readings of ``bench/upload/run.py`` (50 devices x 4 metrics, one a minute) are handed
over as parsed columns (:class:`fieldgate.batchfile.Columns`, 25,000 readings a chunk,
batches of 50,000) to each layout, in a fresh SQLite file with the hub's pragmas (WAL,
``synchronous=FULL``, 64 MiB cache), and the process's CPU seconds are printed per million
readings, alternating the layouts ``--passes`` times:

- ``hub``: the hub's own :meth:`SqliteHubStorage.ingest`, whatever it is at the time
  (when this bench was written, session 6: series + ``samples`` keyed ``(series, ts)``
  WITHOUT ROWID, staged in a temporary table; since session 9, blocks much like the
  ``json`` prototype below, cut by :mod:`fieldgate.hub.table`), rollups and series upkeep
  included. The prototypes below are session 6's and stay as they were, for comparison;
- ``blocks``: a prototype of readings stored per series in blocks, one row per series and
  batch (``ts`` and ``value`` as packed arrays), with the same upkeep of series counts and
  rollups, and a check that each block starts after its series' last reading. Only the
  ingest's common path (each block starts after its series' last reading held) exists
  here; the read API, retention, the ``readings`` view and PostgreSQL do not. It says
  what such a layout could save, nothing more;
- ``json``: the same blocks with each block's readings as one JSON text ``[[ts, value],
  …]``, so that a view over ``json_each`` gives plain SQL the contract's ``readings``
  columns; the bench reads every reading back through it and compares them exactly.

Then, from each batch's ``readings.csv`` (as the uploader renders it: the parse included,
no unzip or SHA-256):

- ``hub+parse``: the hub's own parser (:func:`fieldgate.batchfile.parse_csv_columns`) and
  ingest, as ``PUT /uploads/<token>`` runs them;
- ``arrow``: only when pyarrow is installed (in the hub extra since session 9): the
  CSV parsed by ``pyarrow.csv``, grouped per series, the rollups aggregated and the
  packed blocks cut by ``pyarrow.compute`` (no Python object per reading), then the same
  SQL as ``blocks``. The name checks, the hub's limits on lines and rows and the refusal
  of quoted fields are not there: it says what parsing and grouping in C would save.

The budget for the hub (issue 17: uploader + hub <= 2x the baseline's CPU) is printed
beside them: 2x the baseline's 1.7-2.3 CPU-s less the uploader's 2.0-2.3, the hub's parse
(~1.0) and its start (~0.4). Run from the repository root:

    .venv/bin/python bench/upload/hub_sql.py [--rows N] [--batch-rows N] [--passes N]
"""

from __future__ import annotations

import argparse
import bisect
import fcntl
import importlib.util
import io
import json
import operator
import os
import sqlite3
import tempfile
import time
from array import array
from collections.abc import Iterable
from pathlib import Path

from fieldgate.batchfile import Columns, parse_csv_columns, render_csv
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
    store_blocks(conn, lock, n, total, blocks, rollups, upkeep)


def store_blocks(
    conn: sqlite3.Connection,
    lock: int,
    n: int,
    rows: int,
    blocks: list,
    rollups: Iterable,
    upkeep: list,
) -> None:
    """Batch ``n``'s blocks, rollups and series upkeep in one transaction under the ingest
    lock (both block layouts: built in Python or by pyarrow)."""
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        conn.execute("BEGIN IMMEDIATE")
        seq = conn.execute(
            "INSERT INTO batches (serial, batch_id, rows) VALUES (?, ?, ?) RETURNING seq",
            (SERIAL, f"{n:08d}", rows),
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


def csv_texts(data: list[list[Columns]]) -> list[bytes]:
    """Each batch's readings.csv as the uploader renders it."""
    return [
        render_csv(
            r
            for c in chunks
            for r in zip(c.devices, c.ts, c.metrics, c.values, strict=True)
        )
        for chunks in data
    ]


def run_hub_parse(path: Path, texts: list[bytes]) -> float:
    st = SqliteHubStorage(path)
    cpu = time.process_time()
    for n, text in enumerate(texts):
        lines = parse_csv_columns(io.StringIO(text.decode("utf-8")))
        st.ingest(SERIAL, f"{n:08d}", lines, manifest={})
    cpu = time.process_time() - cpu
    st.close()
    return cpu


def run_arrow(path: Path, texts: list[bytes]) -> float:
    # imported here: pyarrow is optional, only this layout needs it
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA cache_size = -65536")
    conn.executescript(BLOCKS_SCHEMA)
    lock = os.open(f"{path}-ingest", os.O_RDONLY | os.O_CREAT, 0o644)
    types = {"device": pa.string(), "ts": pa.int64(), "metric": pa.string()}
    convert = pcsv.ConvertOptions(
        column_types={**types, "value": pa.float64()}, strings_can_be_null=False
    )
    ids: dict[str, int] = {}
    cpu = time.process_time()
    for n, text in enumerate(texts):
        t = pcsv.read_csv(io.BytesIO(text), convert_options=convert)
        names = pc.dictionary_encode(
            pc.binary_join_element_wise(t["device"], t["metric"], "\x00")
        ).combine_chunks()
        for name in names.dictionary.to_pylist():
            if name not in ids:
                ids[name] = conn.execute(
                    "INSERT INTO series (serial, device, metric) VALUES (?, ?, ?) RETURNING id",
                    (SERIAL, *name.split("\x00")),
                ).fetchone()[0]
        sid_of = pa.array([ids[k] for k in names.dictionary.to_pylist()], pa.int64())
        values = t["value"].combine_chunks()
        if not pc.all(pc.is_finite(values)).as_py():
            raise SystemExit("bench: a value is not finite")
        tab = pa.table(
            {
                "s": pc.take(sid_of, names.indices),
                "ts": t["ts"].combine_chunks(),
                "v": values,
            }
        )
        tab = tab.take(
            pc.sort_indices(tab, sort_keys=[("s", "ascending"), ("ts", "ascending")])
        )
        ts, vs = tab["ts"].combine_chunks(), tab["v"].combine_chunks()
        if (
            len(ts) > 1
            and not pc.all(
                pc.or_(
                    pc.not_equal(ts.slice(1), ts.slice(0, len(ts) - 1)),
                    pc.not_equal(tab["s"].slice(1), tab["s"].slice(0, len(ts) - 1)),
                )
            ).as_py()
        ):
            raise ValueError("a reading twice in one batch: the slow path is not built")
        t_buf, v_buf = ts.buffers()[1], vs.buffers()[1]
        runs = pc.run_end_encode(tab["s"].combine_chunks())
        blocks = []
        upkeep = []
        start = 0
        for sid, end in zip(
            runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True
        ):
            first, last = ts[start].as_py(), ts[end - 1].as_py()
            blocks.append(
                (
                    sid,
                    first,
                    last,
                    end - start,
                    t_buf[(ts.offset + start) * 8 : (ts.offset + end) * 8].to_pybytes(),
                    v_buf[(vs.offset + start) * 8 : (vs.offset + end) * 8].to_pybytes(),
                )
            )
            upkeep.append((end - start, first, first, last, last, sid))
            start = end
        bucket = pc.multiply(pc.divide(tab["ts"], ROLLUP_MS), ROLLUP_MS)
        stats = (
            pa.table({"s": tab["s"], "b": bucket, "v": tab["v"]})
            .group_by(["s", "b"])
            .aggregate([("v", "min"), ("v", "max"), ("v", "sum"), ("v", "count")])
        )
        rollups = zip(
            *(
                stats[c].to_pylist()
                for c in ("s", "b", "v_min", "v_max", "v_sum", "v_count")
            ),
            strict=True,
        )
        del t, tab, names, ts, vs, values, bucket
        store_blocks(conn, lock, n, sum(b[3] for b in blocks), blocks, rollups, upkeep)
    cpu = time.process_time() - cpu
    stored = sorted(
        (device, ts, metric, value)
        for device, metric, t_blob, v_blob in conn.execute(
            "SELECT s.device, s.metric, b.ts, b.value FROM blocks b JOIN series s ON s.id = b.series"
        )
        for ts, value in zip(array("q", t_blob), array("d", v_blob), strict=True)
    )
    os.close(lock)
    conn.close()
    sent = sorted(
        (device, int(ts), metric, float(value))
        for text in texts
        for device, ts, metric, value in (
            line.split(",") for line in text.decode().splitlines()[1:]
        )
    )
    if stored != sent:
        raise SystemExit("bench: the arrow blocks do not hold the readings sent")
    return cpu


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
        texts = csv_texts(data)
        parsed: list[tuple[str, object]] = [("hub+parse", run_hub_parse)]
        if importlib.util.find_spec("pyarrow") is not None:
            parsed.append(("arrow", run_arrow))
        else:
            print("pyarrow is not installed: the arrow layout is not measured")
        for name, _ in parsed:
            got[name] = []
        for p in range(args.passes):
            for name, fn in parsed:
                cpu = fn(Path(tmp) / f"{name}-{p}.db", texts) * per_m  # type: ignore[operator]
                got[name].append(cpu)
                print(
                    f"pass {p + 1} {name:9s}: {cpu:.2f} CPU-s per million (parse included)"
                )
    hub, blocks, js = (min(got[k]) for k in ("hub", "blocks", "json"))
    print(
        f"best: hub {hub:.2f}, blocks {blocks:.2f} ({blocks / hub:.2f}x), "
        f"json blocks {js:.2f} ({js / hub:.2f}x) CPU-s per million"
    )
    if got.get("arrow"):
        hp, ar = min(got["hub+parse"]), min(got["arrow"])
        print(
            f"parse included: hub {hp:.2f}, arrow {ar:.2f} ({ar / hp:.2f}x) CPU-s per million"
        )
    print(
        "the hub's budget (issue 17): about 0.0-0.9 CPU-s per million readings for the storage, "
        "1.0-1.9 with the parse"
    )
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
