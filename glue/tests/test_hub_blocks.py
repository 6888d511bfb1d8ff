"""The SQLite hub's blocks (schema 4; ts as offsets from a base since schema 5): a batch's
readings of a series that come after the series' last one are one row of ``blocks`` (JSON
text); late, repeated or overlapping readings explode the blocks they touch into
``samples`` and are merged there. Whatever the path, the readings view, the raw and
bucketed reads, latest, the counts and the rollups say exactly what was stored, and
retention cuts through a block, of either kind."""

from __future__ import annotations

import math
import random
import sqlite3
import statistics
import struct
from pathlib import Path

import pyarrow as pa
import pytest
from support import query_db

from fieldgate import store
from fieldgate.hub.sqlite_storage import MIGRATIONS, SqliteHubStorage
from fieldgate.hub.sqlstore import ROLLUP_MS
from fieldgate.hub.table import decode_points, value_texts

T0 = 1_767_225_600_000
Reading = tuple[str, int, str, float]


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def view(db: Path) -> dict[tuple[str, int, str], float]:
    rows = query_db(str(db), "SELECT device, ts, metric, value, typeof(value) FROM readings")
    assert {r[4] for r in rows} <= {"real"}
    out = {(d, ts, m): v for d, ts, m, v, _ in rows}
    assert len(out) == len(rows), "a reading is held twice"
    return out


def expect(*batches: list[Reading]) -> dict[tuple[str, int, str], float]:
    """What the hub holds after these batches: the first of a (device, ts, metric) kept."""
    out: dict[tuple[str, int, str], float] = {}
    for batch in batches:
        for d, ts, m, v in batch:
            out.setdefault((d, ts, m), v)
    return out


def check(st: SqliteHubStorage, db: Path, want: dict[tuple[str, int, str], float]) -> None:
    """The view, raw reads, counts, latest, rollups and buckets agree with ``want``."""
    got = view(db)
    assert got.keys() == want.keys()
    assert all(bits(got[k]) == bits(v) for k, v in want.items())
    per: dict[tuple[str, str], dict[int, float]] = {}
    for (d, ts, m), v in want.items():
        per.setdefault((d, m), {})[ts] = v
    latest = {(d, m): (ts, v, n) for d, m, ts, v, n in st.latest("GW")}
    for (d, m), rows in per.items():
        s = st.series("GW", d, m)
        assert s is not None and (s.first_ts, s.last_ts, s.count) == (
            min(rows),
            max(rows),
            len(rows),
        )
        raw = list(st.readings(s.id, 0, 2**53))
        assert [t for t, _ in raw] == sorted(rows)
        assert all(bits(v) == bits(rows[t]) for t, v in raw)
        mid = sorted(rows)[len(rows) // 3]
        assert [t for t, _ in st.readings(s.id, mid, mid + 7_777)] == [
            t for t in sorted(rows) if mid <= t < mid + 7_777
        ]
        last = max(rows)
        assert latest[(d, m)] == (last, rows[last], len(rows))
        for every, origin in ((60_000, T0), (ROLLUP_MS, 0), (3 * ROLLUP_MS, 0)):
            start, end = min(rows) + 1, max(rows)
            buckets: dict[int, list[float]] = {}
            for t, v in rows.items():
                if start <= t < end:
                    buckets.setdefault(origin + (t - origin) // every * every, []).append(v)
            got_b = st.buckets(s.id, start, end, every, origin)
            assert [(b, lo, hi, n) for b, lo, hi, _, n in got_b] == [
                (b, min(vs), max(vs), len(vs)) for b, vs in sorted(buckets.items())
            ]
            assert [g[3] for g in got_b] == pytest.approx(
                [statistics.fmean(vs) for _, vs in sorted(buckets.items())], rel=1e-12
            )
    rollups = query_db(
        str(db),
        "SELECT s.device, s.metric, r.bucket, r.min, r.max, r.count FROM rollups r "
        "JOIN series s ON s.id = r.series ORDER BY 1, 2, 3",
    )
    want_r: dict[tuple[str, str, int], list[float]] = {}
    for (d, ts, m), v in want.items():
        want_r.setdefault((d, m, ts // ROLLUP_MS * ROLLUP_MS), []).append(v)
    assert rollups == [(*k, min(vs), max(vs), len(vs)) for k, vs in sorted(want_r.items())]
    gw = st.gateway("GW")
    assert gw is not None and gw["rows"] == len(want)


def held_in(db: Path) -> tuple[int, int]:
    """(blocks, samples) rows."""
    return (
        query_db(str(db), "SELECT COUNT(*) FROM blocks")[0][0],
        query_db(str(db), "SELECT COUNT(*) FROM samples")[0][0],
    )


def series_rows(device: str, metric: str, start: int, n: int, step: int = 1000) -> list[Reading]:
    rnd = random.Random(f"{device}{metric}{start}")
    return [(device, start + i * step, metric, round(rnd.uniform(-40, 60), 3)) for i in range(n)]


def test_appended_batches_are_blocks_and_late_ones_merge_exactly(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    st = SqliteHubStorage(db)
    try:
        # two series interleaved in the file, in time order: one block per series and batch
        a = series_rows("D", "t", T0, 900) + series_rows("E", "h", T0, 900, 1700)
        b = series_rows("D", "t", T0 + 900_000, 900) + series_rows("E", "h", T0 + 2_000_000, 50)
        random.Random(3).shuffle(a)  # a series' order in the file does not matter
        assert st.ingest("GW", "b-1", a) == 1800
        assert st.ingest("GW", "b-2", b) == 950
        assert held_in(db) == (4, 0)
        check(st, db, expect(a, b))
        # the same batch sent again under another id: nothing new, the blocks it touches
        # become samples
        assert st.ingest("GW", "b-3", b) == 0
        assert st.stored_batch("GW", "b-3").new_rows == 0  # type: ignore[union-attr]
        check(st, db, expect(a, b))
        # old readings after new ones (between and before those held), some of them held
        # already (other values: the held ones stay), and a reading twice in the batch
        late = [("D", T0 + 500 + i * 1000, "t", float(i)) for i in range(300)]
        late += [("D", T0 - 5000, "t", -1.0), ("D", T0 + 5000, "t", 99.0)]
        late += [("D", T0 + 77_777, "t", 1.25), ("D", T0 + 77_777, "t", 2.5)]
        assert st.ingest("GW", "b-4", late) == 302
        check(st, db, expect(a, b, late))
        # readings overlapping the last block of E, and a series of its own after them
        over = series_rows("E", "h", T0 + 2_000_000 + 500, 80) + series_rows("F", "p", T0, 10)
        assert st.ingest("GW", "b-5", over) == 90
        check(st, db, expect(a, b, late, over))
        # and appending still makes blocks
        nxt = series_rows("D", "t", T0 + 10_000_000, 100)
        before = held_in(db)
        assert st.ingest("GW", "b-6", nxt) == 100
        assert held_in(db) == (before[0] + 1, before[1])
        check(st, db, expect(a, b, late, over, nxt))
    finally:
        st.close()


def test_late_readings_explode_only_the_blocks_they_overlap(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    st = SqliteHubStorage(db)
    try:
        parts = [series_rows("D", "t", T0 + k * 1_000_000, 500) for k in range(4)]
        for k, part in enumerate(parts):
            st.ingest("GW", f"b-{k}", part)
        assert held_in(db) == (4, 0)
        # late readings inside the second block's span (and one held already): only that
        # block becomes samples; the blocks before and after it stay blocks
        late = [("D", T0 + 1_000_500 + i * 1000, "t", float(i)) for i in range(100)]
        late.append(parts[1][7])
        assert st.ingest("GW", "late", late) == 100
        assert held_in(db) == (3, 600)
        check(st, db, expect(*parts, late))
        # between two blocks, touching neither: no block is exploded
        gap = [("D", T0 + 1_499_000 + 250, "t", 4.5)]
        assert st.ingest("GW", "gap", gap) == 1
        assert held_in(db) == (3, 601)
        check(st, db, expect(*parts, late, gap))
    finally:
        st.close()


def test_duplicates_inside_a_batch_keep_the_first_in_the_file(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    st = SqliteHubStorage(db)
    try:
        rows = [("D", T0 + i * 1000, "t", float(i)) for i in range(100)]
        rows += [("D", T0 + 5000, "t", -5.0), ("D", T0 + 99_000, "t", -99.0)]
        assert st.ingest("GW", "b-1", rows) == 100
        stored = st.stored_batch("GW", "b-1")
        assert stored is not None and (stored.rows, stored.new_rows) == (102, 100)
        assert held_in(db) == (1, 0)
        check(st, db, expect(rows))
    finally:
        st.close()


def test_retention_cuts_through_blocks(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    st = SqliteHubStorage(db)
    try:
        batches = [series_rows("D", "t", T0 + k * 600_000, 600) for k in range(5)]
        for k, rows in enumerate(batches):
            st.ingest("GW", f"b-{k}", rows, test=k == 1)
        late = [("D", T0 + 1_200_500 + i * 1000, "t", 7.0) for i in range(50)]  # samples
        st.ingest("GW", "late", late)
        want = expect(*batches, late)
        cut = T0 + 1_500_250  # inside the third batch's block
        deleted = 0
        while n := st.delete_before(cut, 250):
            assert n <= 600  # a whole block at most, otherwise max_rows
            deleted += n
        assert deleted == sum(1 for k in want if k[1] < cut)
        want = {k: v for k, v in want.items() if k[1] >= cut}
        check(st, db, want)
        gw = st.gateway("GW")
        assert gw is not None and gw["test_rows"] == 0
    finally:
        st.close()


def doubles() -> list[float]:
    rnd = random.Random(17)
    out: list[float] = []
    while len(out) < 20_000:
        x = struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(x):
            out.append(x)
    out += [rnd.uniform(-1e6, 1e6) for _ in range(5000)]
    out += [round(rnd.uniform(-1000, 1000), 3) for _ in range(5000)]
    out += [rnd.choice((-1, 1)) * 10.0 ** rnd.uniform(-320, 308) for _ in range(5000)]
    out += [float(rnd.randint(-(10**6), 10**6)) for _ in range(1000)]
    out += [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308]
    out += [-1.7976931348623157e308, 2.0**53, 2.0**63, 1e15, 123456789012345.0, 0.1, 1 / 3]
    return out


def test_every_double_survives_blocks_exactly(tmp_path: Path) -> None:
    """The JSON text of a block is read back bit for bit by SQLite's JSON functions (the
    readings view) and by the hub's own decoder (raw reads and buckets)."""
    values = doubles()
    texts = value_texts(pa.array(values, pa.float64())).to_pylist()
    assert not [t for t in texts if "." not in t and "e" not in t]  # no integer literal
    db = tmp_path / "hub.db"
    st = SqliteHubStorage(db)
    try:
        rows = [("D", T0 + i, "v", v) for i, v in enumerate(values)]
        assert st.ingest("GW", "b-1", rows) == len(rows)
        assert held_in(db) == (1, 0)
        got = view(db)
        assert all(bits(got[("D", T0 + i, "v")]) == bits(v) for i, v in enumerate(values))
        sid = st.series("GW", "D", "v").id  # type: ignore[union-attr]
        raw = list(st.readings(sid, 0, 2**53))
        assert [bits(v) for _, v in raw] == [bits(v) for v in values]
        (points, base) = query_db(str(db), "SELECT points, base FROM blocks")[0]
        assert base == T0 and points.startswith("[[0,")
        ts, vs = decode_points([points], [base])
        assert ts.to_pylist() == [T0 + i for i in range(len(values))]
        assert [bits(v) for v in vs.to_pylist()] == [bits(v) for v in values]
    finally:
        st.close()


def test_a_schema_3_database_keeps_its_samples_and_appends_blocks(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for v in (1, 2, 3):
        for statement in store._statements(MIGRATIONS[v]):
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('hub_schema_version', '3')")
    old = series_rows("D", "t", T0, 1500)
    conn.execute(
        "INSERT INTO gateways (serial, created_at, rows, batches) VALUES ('GW', 1, ?, 1)",
        (len(old),),
    )
    conn.execute(
        "INSERT INTO batches (seq, serial, batch_id, state, rows, new_rows, stored_at) "
        "VALUES (1, 'GW', 'b-0', 'stored', ?, ?, 1)",
        (len(old), len(old)),
    )
    conn.execute(
        "INSERT INTO series (id, serial, device, metric, first_ts, last_ts, count) "
        "VALUES (1, 'GW', 'D', 't', ?, ?, ?)",
        (old[0][1], old[-1][1], len(old)),
    )
    conn.executemany(
        "INSERT INTO samples (series, ts, value, batch) VALUES (1, ?, ?, 1)",
        [(ts, v) for _, ts, _, v in old],
    )
    conn.execute(
        "INSERT INTO rollups SELECT series, (ts / 600000) * 600000, MIN(value), MAX(value), "
        "SUM(value), COUNT(*) FROM samples GROUP BY series, ts / 600000"
    )
    conn.close()
    st = SqliteHubStorage(db)
    try:
        assert query_db(str(db), "SELECT value FROM meta WHERE key = 'hub_schema_version'") == [
            (str(max(MIGRATIONS)),)
        ]
        assert held_in(db) == (0, 1500)
        check(st, db, expect(old))
        new = series_rows("D", "t", T0 + 1_500_000, 500)
        assert st.ingest("GW", "b-1", new) == 500
        assert held_in(db) == (1, 1500)
        check(st, db, expect(old, new))
        # a batch overlapping both the samples and the block
        mixed = series_rows("D", "t", T0 + 1_400_000 + 300, 300)
        assert st.ingest("GW", "b-2", mixed) == 300
        check(st, db, expect(old, new, mixed))
    finally:
        st.close()


def to_schema_4(db: Path) -> None:
    """Turn a hub database back into schema 4: its blocks' ts absolute, no base column."""
    conn = sqlite3.connect(db, isolation_level=None)
    for rowid, points, base in conn.execute("SELECT rowid, points, base FROM blocks").fetchall():
        ts, vs = decode_points([points], [base])
        items = zip(ts.to_pylist(), value_texts(vs).to_pylist(), strict=True)
        text = "[[" + "],[".join(f"{t},{v}" for t, v in items) + "]]"
        conn.execute("UPDATE blocks SET points = ? WHERE rowid = ?", (text, rowid))
    conn.execute("DROP VIEW readings")
    conn.execute("ALTER TABLE blocks DROP COLUMN base")
    (view_sql,) = [s for s in store._statements(MIGRATIONS[4]) if "CREATE VIEW" in s]
    conn.execute(view_sql)
    conn.execute("UPDATE meta SET value = '4' WHERE key = 'hub_schema_version'")
    conn.close()


def test_schema_4_blocks_and_offset_blocks_read_alike(tmp_path: Path) -> None:
    """Blocks of schema 4 (absolute ts, base 0 after the migration) and blocks with ts as
    offsets from their base, in one series: read, exploded and cut by retention alike."""
    db = tmp_path / "hub.db"
    parts = [series_rows("D", "t", T0 + k * 600_000, 600) for k in range(6)]
    st = SqliteHubStorage(db)
    for k in range(3):
        st.ingest("GW", f"b-{k}", parts[k])
    st.close()
    to_schema_4(db)
    assert query_db(str(db), "SELECT points FROM blocks ORDER BY first_ts")[0][0].startswith(
        f"[[{T0},"
    )
    st = SqliteHubStorage(db)
    try:
        assert query_db(str(db), "SELECT value FROM meta WHERE key = 'hub_schema_version'") == [
            (str(max(MIGRATIONS)),)
        ]
        assert query_db(str(db), "SELECT DISTINCT base FROM blocks") == [(0,)]
        check(st, db, expect(*parts[:3]))
        for k in range(3, 6):
            st.ingest("GW", f"b-{k}", parts[k])
        blocks = query_db(str(db), "SELECT base, first_ts, points FROM blocks ORDER BY first_ts")
        assert [b[0] for b in blocks] == [0, 0, 0] + [T0 + k * 600_000 for k in range(3, 6)]
        assert all(p.startswith("[[0,") for base, _, p in blocks if base)
        ts, _ = decode_points([p for _, _, p in blocks], [b for b, _, _ in blocks])
        assert ts.to_pylist() == [t for part in parts for _, t, _, _ in part]
        check(st, db, expect(*parts))
        # late readings across the last old block and the first new one: both exploded
        late = [("D", T0 + 1_700_500 + i * 1000, "t", float(i)) for i in range(200)]
        assert st.ingest("GW", "late", late) == 200
        assert held_in(db) == (4, 1400)
        check(st, db, expect(*parts, late))
        # retention cutting through an old block, then through a new one
        want = expect(*parts, late)
        for cut in (T0 + 300_250, T0 + 2_700_250):
            while st.delete_before(cut, 250):
                pass
            want = {k: v for k, v in want.items() if k[1] >= cut}
            check(st, db, want)
        assert held_in(db)[0] == 1  # the last new block (the one before it cut)
    finally:
        st.close()
