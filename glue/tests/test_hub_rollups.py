"""The per-minute rollups behind long-window statistics, on both backends: after every kind
of ingest (new readings, repeated ones, a batch overlapping stored minutes, concurrent
gateways) and after retention cutting a minute in two, each rollup row is exactly the
statistics of its minute's readings, and ``buckets()`` answers what the readings say for
buckets in whole minutes (rollups plus partial minutes) and for any other width."""

from __future__ import annotations

import random
import statistics

import pytest
from support import query_db

from fieldgate.hub import pg_storage, sqlite_storage
from fieldgate.hub.backends import open_storage
from fieldgate.hub.sqlstore import READINGS_VIEW, ROLLUP_MS, ROLLUP_REBUILD
from fieldgate.hub.storage import HubStorage

T0 = 1_767_225_600_000
MINUTE = 60_000


def rollups_match_samples(db: str) -> int:
    """Compare the rollups with the readings (the ``readings`` view: the samples, and on
    SQLite the blocks) bucket by bucket; how many rows were compared."""
    want = query_db(
        db,
        "SELECT s.id, (r.ts / ?) * ? AS m, MIN(r.value), MAX(r.value), SUM(r.value), COUNT(*) "
        "FROM readings r JOIN series s ON s.serial = r.serial AND s.device = r.device "
        "AND s.metric = r.metric GROUP BY s.id, m ORDER BY s.id, m",
        (ROLLUP_MS, ROLLUP_MS),
    )
    got = query_db(
        db, "SELECT series, bucket, min, max, sum, count FROM rollups ORDER BY series, bucket"
    )
    assert [r[:2] for r in got] == [r[:2] for r in want]
    for g, w in zip(got, want, strict=True):
        assert (g[2], g[3], g[5]) == (w[2], w[3], w[5]), (g, w)
        assert g[4] == pytest.approx(w[4], rel=1e-12)
    return len(got)


def brute_buckets(
    rows: dict[int, float], start: int, end: int, every: int, origin: int
) -> list[tuple[int, float, float, float, int]]:
    out: dict[int, list[float]] = {}
    for ts, v in rows.items():
        if start <= ts < end:
            out.setdefault(origin + (ts - origin) // every * every, []).append(v)
    return [(b, min(vs), max(vs), statistics.fmean(vs), len(vs)) for b, vs in sorted(out.items())]


def held(st: HubStorage, sid: int) -> dict[int, float]:
    return dict(st.readings(sid, 0, 2**53))


def test_rollups_stay_exact_through_ingest_repeats_and_retention(hub_db: str) -> None:
    rnd = random.Random(13)
    st = open_storage(hub_db)
    try:
        # 3 hours at 1 Hz with a value that moves
        first = [("D", T0 + i * 1000, "t", round(rnd.uniform(-5, 30), 3)) for i in range(10_800)]
        assert st.ingest("GW", "b-1", first[:6000]) == 6000
        # the next batch starts inside the last stored minute and repeats a few readings
        assert st.ingest("GW", "b-2", first[5990:]) == 10_800 - 6000
        # a late batch with readings in the middle of stored minutes (half of them held)
        odd = [("D", T0 + 30_500 + i * 1000, "t", 100.0 + i) for i in range(120)]
        assert st.ingest("GW", "b-3", odd + first[100:160]) == 120
        # another series, another gateway, out of order
        other = [("E", T0 + i * 7_001, "h", float(i % 13)) for i in range(2000)]
        assert st.ingest("GW-2", "b-1", reversed(other)) == 2000
        held_rows = first + odd + other
        assert rollups_match_samples(hub_db) == len({(r[0], r[1] // ROLLUP_MS) for r in held_rows})
        # retention cutting a minute in two, in pieces of 1,000 readings
        cut, deleted = T0 + 95 * MINUTE + 17_250, 0
        while n := st.delete_before(cut, 1000):
            deleted += n
        assert deleted == sum(1 for r in first + odd + other if r[1] < cut)
        rollups_match_samples(hub_db)

        series = st.series("GW", "D", "t")
        assert series is not None
        rows = held(st, series.id)
        for every, start, end, origin in (
            (ROLLUP_MS, T0, T0 + 4 * 3_600_000, T0),  # whole rollup buckets only
            (2 * ROLLUP_MS, T0 + 12_345, T0 + 10_000_123, T0),  # partial ones at both ends
            (3_600_000, T0 + 96 * MINUTE + 5, T0 + 97 * MINUTE - 5, 0),  # within one
            (60_000, T0, T0 + 4 * 3_600_000, T0),  # not whole rollup buckets: the samples
            (ROLLUP_MS, T0 + 1, T0 + 3 * 3_600_000, T0 + 1),  # not counted from one
        ):
            got = st.buckets(series.id, start, end, every, origin)
            want = brute_buckets(rows, start, end, every, origin)
            assert [g[:3] + g[4:] for g in got] == [w[:3] + w[4:] for w in want], every
            assert [g[3] for g in got] == pytest.approx([w[3] for w in want], rel=1e-12)
    finally:
        st.close()


def test_an_old_database_gets_its_rollups(hub_db: str) -> None:
    """Migrating builds the rollups of the readings already held (shown here by undoing the
    migration and running it again from the version before)."""
    st = open_storage(hub_db)
    try:
        st.ingest("GW", "b-1", [("D", T0 + i * 1500, "t", float(i)) for i in range(500)])
    finally:
        st.close()
    before = 1 if hub_db.startswith("postgresql://") else 2
    if before == 2:  # SQLite's schema 2 has no blocks: their readings back into samples
        (sid,) = query_db(hub_db, "SELECT id FROM series")[0]
        query_db(hub_db, sqlite_storage.EXPLODE.format(where="1"), (sid,))
        query_db(hub_db, "DROP VIEW readings")
        query_db(hub_db, "DROP TABLE blocks")
        query_db(hub_db, READINGS_VIEW)
    query_db(hub_db, "DROP TABLE rollups")
    query_db(hub_db, "ALTER TABLE gateways DROP COLUMN last_brief")
    query_db(hub_db, "UPDATE meta SET value = ? WHERE key = 'hub_schema_version'", (str(before),))
    open_storage(hub_db).close()
    assert rollups_match_samples(hub_db) == len({(T0 + i * 1500) // ROLLUP_MS for i in range(500)})


def test_the_rollup_width_is_the_same_everywhere() -> None:
    """The migrations and the rebuild write the width out; they agree with ROLLUP_MS."""
    for sql in (ROLLUP_REBUILD, sqlite_storage.MIGRATIONS[3], pg_storage.MIGRATIONS[2]):
        assert f"(ts / {ROLLUP_MS}) * {ROLLUP_MS}" in sql


def test_an_ingest_rebuilds_no_rollups_but_those_of_its_own_readings(hub_db: str) -> None:
    # An ingest's work is bounded by its batch, not by what the series holds: a rollup row
    # of a bucket the batch has no reading in is left as it is. The test marks one such row
    # (a count no rebuild would give) and looks for the mark after ingests of new readings
    # (the statistics added) and of partly repeated ones (the touched buckets rebuilt).
    st = open_storage(hub_db)
    try:
        hours = [("D", T0 + i * MINUTE, "t", float(i % 17)) for i in range(600)]
        assert st.ingest("GW", "b-1", hours) == 600
        sid = st.series("GW", "D", "t").id  # type: ignore[union-attr]
        query_db(
            hub_db,
            "UPDATE rollups SET count = count + 1000 WHERE series = ? AND bucket = ?",
            (sid, T0),
        )
        later = [("D", T0 + (600 + i) * MINUTE, "t", 1.0) for i in range(60)]
        assert st.ingest("GW", "b-2", later) == 60
        # readings of the last hour again, and new ones between them: rebuilt from the samples
        again = hours[-60:] + [("D", T0 + i * MINUTE + 30_000, "t", 2.0) for i in range(540, 600)]
        # a fresh storage object: the series is known to the database, not to its cache
        other = open_storage(hub_db)
        try:
            assert other.ingest("GW", "b-3", again) == 60
        finally:
            other.close()
        marked = query_db(
            hub_db, "SELECT count FROM rollups WHERE series = ? AND bucket = ?", (sid, T0)
        )
        assert marked == [(1010,)]
        query_db(
            hub_db,
            "UPDATE rollups SET count = count - 1000 WHERE series = ? AND bucket = ?",
            (sid, T0),
        )
        assert rollups_match_samples(hub_db) == 66
        assert [(b, n) for b, _, _, _, n in held_buckets(st, sid)] == [
            (T0 + k * ROLLUP_MS, 20 if 54 <= k < 60 else 10) for k in range(66)
        ]
    finally:
        st.close()


def held_buckets(st: HubStorage, sid: int) -> list[tuple[int, float, float, float, int]]:
    return st.buckets(sid, T0, T0 + 2 * 86_400_000, ROLLUP_MS, T0)


def test_a_reading_twice_in_one_batch_is_stored_once(hub_db: str) -> None:
    # new_rows counts it once, and so do its series and its rollup (on SQLite the batch
    # takes the path for readings already held: the change count falls short)
    st = open_storage(hub_db)
    try:
        rows = [("D", T0 + i * 1000, "t", float(i)) for i in range(100)]
        rows.insert(50, ("D", T0 + 7000, "t", 7.0))
        rows.append(("E", T0, "h", 5.0))
        rows.append(("E", T0, "h", 5.0))
        assert st.ingest("GW", "b-1", rows) == 101
        assert query_db(hub_db, "SELECT new_rows, rows FROM batches") == [(101, 103)]
        d = st.series("GW", "D", "t")
        e = st.series("GW", "E", "h")
        assert d is not None and e is not None and (d.count, e.count) == (100, 1)
        assert held(st, d.id) == {T0 + i * 1000: float(i) for i in range(100)}
        assert held(st, e.id) == {T0: 5.0}
        assert rollups_match_samples(hub_db) == 2
    finally:
        st.close()
