"""The hub's default storage backend: one SQLite file (WAL, synchronous=FULL) for all gateways.

It implements :class:`fieldgate.hub.storage.HubStorage` with the shared SQL of
:mod:`fieldgate.hub.sqlstore`; connections, migrations and transactions come from
:mod:`fieldgate.store`, like the gateway's own store. Every write is a ``BEGIN IMMEDIATE``
transaction, so writers of several processes take turns (busy timeout 60 s) and a batch,
a PIN or an upload token is decided by exactly one of them.

Readings are stored in ``blocks`` (schema 4): one row per series and batch holding the
batch's readings of the series as JSON text ``[[ts,value],...]`` in ts order, each ts an
offset from the block's ``base`` (schema 5: its first ts; 0 in the blocks of schema 4,
whose ts are absolute), cut before the lock by :func:`fieldgate.hub.table.cut_blocks`. A
batch's readings of a series that all come after its last one held become one block;
otherwise the series' blocks they may overlap are exploded into ``samples`` and the
readings merged there one by one (a reading is held exactly once: blocks never overlap
each other or the series' samples). Readings held before schema 4 stay in ``samples``.
The ``readings`` view expands the blocks with ``json_each``; the hub's own reads decode
them with pyarrow (both add the base back: :data:`POINT_TS`,
:func:`~fieldgate.hub.table.decode_points`).

Ingests queue on an exclusive ``flock`` of ``<db>-ingest`` before they begin: the kernel
wakes the next one the moment the previous one lets go, where SQLite's busy handler polls
in sleeps of up to 100 ms and leaves the write lock idle in between (with four uploads at
once that cost about a sixth of the hub's ingest rate). Short writes keep the busy timeout.
"""

from __future__ import annotations

import fcntl
import heapq
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from fieldgate import store
from fieldgate.hub.sqlstore import (
    READINGS_VIEW,
    ROLLUP_MS,
    SAMPLE_POINTS,
    SqlHubStorage,
    check_names,
)
from fieldgate.hub.table import (
    Cut,
    Readings,
    Run,
    bucket_sums,
    cut_blocks,
    decode_points,
    pairs_of,
    readings_table,
)

#: The readings of blocks, one row per reading (``k``: the blocks): a point's ts is an
#: offset from its block's base (0 in the blocks of schema 4: their ts are absolute).
POINTS = "json_each(k.points) j"
POINT_TS = "k.base + (j.value ->> 0)"
POINT_VALUE = "j.value ->> 1"

#: Schema migrations: version -> SQL that brings a hub database from version-1 to version.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS gateways (
        serial        TEXT PRIMARY KEY,
        created_at    INTEGER NOT NULL,
        registered_at INTEGER,
        last_seen     INTEGER,
        last_batch_id TEXT,
        rows          INTEGER NOT NULL DEFAULT 0,
        test_rows     INTEGER NOT NULL DEFAULT 0,
        batches       INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS pins (
        id         INTEGER PRIMARY KEY,
        serial     TEXT    NOT NULL,
        salt       BLOB    NOT NULL,
        pin_hash   BLOB    NOT NULL,            -- PBKDF2-SHA256 of the PIN
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at    INTEGER
    );
    CREATE TABLE IF NOT EXISTS gateway_keys (
        key_hash   TEXT PRIMARY KEY,            -- SHA-256 hex of the key
        serial     TEXT    NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE IF NOT EXISTS batches (
        seq        INTEGER PRIMARY KEY,         -- order in which batches were stored
        serial     TEXT    NOT NULL,
        batch_id   TEXT    NOT NULL,
        state      TEXT    NOT NULL,            -- stored
        rows       INTEGER NOT NULL,
        new_rows   INTEGER NOT NULL,
        sha256     TEXT,
        first_ts   INTEGER,
        last_ts    INTEGER,
        mode       TEXT,
        type       TEXT,
        test       INTEGER NOT NULL DEFAULT 0,
        manifest   TEXT,                        -- JSON, as the gateway sent it
        stored_at  INTEGER NOT NULL,
        UNIQUE (serial, batch_id)
    );
    CREATE TABLE IF NOT EXISTS uploads (
        token_hash TEXT PRIMARY KEY,            -- SHA-256 hex of the upload URL's token
        serial     TEXT    NOT NULL,
        batch_id   TEXT    NOT NULL,
        manifest   TEXT    NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS readings (
        serial   TEXT    NOT NULL,
        device   TEXT    NOT NULL,
        ts       INTEGER NOT NULL,              -- UTC epoch milliseconds
        metric   TEXT    NOT NULL,
        value    REAL    NOT NULL,
        batch_id TEXT    NOT NULL,              -- arrival order: batches.seq of this batch
        test     INTEGER NOT NULL DEFAULT 0,    -- 1: sent in TEST mode
        -- unique over (serial, device, ts, metric), ts before device because readings arrive
        -- roughly in time order, so inserts land near the end of the tree
        PRIMARY KEY (serial, ts, device, metric)
    ) WITHOUT ROWID;
    """,
    # 2: readings become series + samples (keyed (series, ts): one device and metric over a
    # time range is one index range) behind a view with the contract's columns; gateways get
    # a domain and their last heartbeat; users, their domains and failed logins.
    2: """
    CREATE TABLE series (
        id       INTEGER PRIMARY KEY,
        serial   TEXT    NOT NULL,
        device   TEXT    NOT NULL,
        metric   TEXT    NOT NULL,
        first_ts INTEGER,                       -- NULL when retention emptied it
        last_ts  INTEGER,
        count    INTEGER NOT NULL DEFAULT 0,
        UNIQUE (serial, device, metric)
    );
    CREATE INDEX series_first_ts ON series (first_ts) WHERE first_ts IS NOT NULL;
    CREATE TABLE samples (
        series INTEGER NOT NULL,                -- series.id
        ts     INTEGER NOT NULL,                -- UTC epoch milliseconds
        value  REAL    NOT NULL,
        batch  INTEGER NOT NULL,                -- batches.seq of the batch that stored it
        PRIMARY KEY (series, ts)
    ) WITHOUT ROWID;
    INSERT INTO batches (serial, batch_id, state, rows, new_rows, test, stored_at)
        SELECT DISTINCT r.serial, r.batch_id, 'stored', 0, 0, r.test, 0 FROM readings r
        WHERE NOT EXISTS (
            SELECT 1 FROM batches b WHERE b.serial = r.serial AND b.batch_id = r.batch_id
        );
    INSERT INTO series (serial, device, metric, first_ts, last_ts, count)
        SELECT serial, device, metric, MIN(ts), MAX(ts), COUNT(*) FROM readings
        GROUP BY serial, device, metric;
    INSERT INTO samples (series, ts, value, batch)
        SELECT s.id, r.ts, r.value, b.seq FROM readings r
        JOIN series s ON s.serial = r.serial AND s.device = r.device AND s.metric = r.metric
        JOIN batches b ON b.serial = r.serial AND b.batch_id = r.batch_id
        ORDER BY s.id, r.ts;
    DROP TABLE readings;
    """
    + READINGS_VIEW
    + """;
    ALTER TABLE gateways ADD COLUMN domain TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE gateways ADD COLUMN last_heartbeat INTEGER;
    ALTER TABLE gateways ADD COLUMN last_status TEXT;  -- JSON: the gateway's status --json
    CREATE INDEX gateways_domain ON gateways (domain);
    CREATE INDEX pins_serial ON pins (serial);
    CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        password_hash TEXT    NOT NULL,         -- scrypt$n$r$p$salt$hash
        admin         INTEGER NOT NULL DEFAULT 0,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL
    );
    CREATE TABLE user_domains (
        name   TEXT NOT NULL,                   -- users.name
        domain TEXT NOT NULL,
        PRIMARY KEY (name, domain)
    ) WITHOUT ROWID;
    CREATE TABLE login_failures (
        key TEXT    NOT NULL,                   -- user:<name> or addr:<client address>
        at  INTEGER NOT NULL
    );
    CREATE INDEX login_failures_key ON login_failures (key, at);
    CREATE INDEX login_failures_at ON login_failures (at);
    """,
    # 3: per series and ten minutes, the statistics of its readings (charts of long windows);
    # the brief of a gateway's last status (what the fleet page shows of it)
    3: """
    ALTER TABLE gateways ADD COLUMN last_brief TEXT;   -- JSON: hub.overview.brief(status)
    CREATE TABLE rollups (
        series INTEGER NOT NULL,                -- series.id
        bucket INTEGER NOT NULL,                -- start of its ten minutes, epoch ms
        min    REAL    NOT NULL,
        max    REAL    NOT NULL,
        sum    REAL    NOT NULL,
        count  INTEGER NOT NULL,
        PRIMARY KEY (series, bucket)
    ) WITHOUT ROWID;
    INSERT INTO rollups (series, bucket, min, max, sum, count)
        SELECT series, (ts / 600000) * 600000, MIN(value), MAX(value), SUM(value), COUNT(*)
        FROM samples GROUP BY series, ts / 600000;
    """,
    # 4: readings stored in blocks, one row per series and batch (the readings held stay
    # in samples); the view gives both
    4: """
    CREATE TABLE blocks (
        series     INTEGER NOT NULL,            -- series.id
        first_ts   INTEGER NOT NULL,            -- its first and last reading's ts
        last_ts    INTEGER NOT NULL,
        count      INTEGER NOT NULL,
        batch      INTEGER NOT NULL,            -- batches.seq of the batch that stored it
        last_value REAL    NOT NULL,            -- the value of its last reading
        points     TEXT    NOT NULL             -- JSON [[ts,value],...] in ts order
    );
    CREATE UNIQUE INDEX blocks_key ON blocks (series, first_ts);
    DROP VIEW readings;
    CREATE VIEW readings AS
        SELECT s.serial, s.device, r.ts, s.metric, r.value, b.batch_id, b.test
        FROM samples r
        JOIN series s ON s.id = r.series
        JOIN batches b ON b.seq = r.batch
        UNION ALL
        SELECT s.serial, s.device, j.value ->> 0, s.metric, CAST(j.value ->> 1 AS REAL),
            b.batch_id, b.test
        FROM blocks k
        JOIN series s ON s.id = k.series
        JOIN batches b ON b.seq = k.batch,
        json_each(k.points) j;
    """,
    # 5: a block's ts are offsets from its base (its first ts), a quarter less text; the
    # blocks of schema 4 keep their absolute ts (base 0)
    # (written out, as every migration: it never changes, whatever POINT_TS becomes)
    5: """
    ALTER TABLE blocks ADD COLUMN base INTEGER NOT NULL DEFAULT 0;
    DROP VIEW readings;
    CREATE VIEW readings AS
        SELECT s.serial, s.device, r.ts, s.metric, r.value, b.batch_id, b.test
        FROM samples r
        JOIN series s ON s.id = r.series
        JOIN batches b ON b.seq = r.batch
        UNION ALL
        SELECT s.serial, s.device, k.base + (j.value ->> 0), s.metric,
            CAST(j.value ->> 1 AS REAL), b.batch_id, b.test
        FROM blocks k
        JOIN series s ON s.id = k.series
        JOIN batches b ON b.seq = k.batch,
        json_each(k.points) j;
    """,
}

#: The hub database's schema: its own version key, and a foreign database is refused.
HUB_SCHEMA = store.Schema(
    MIGRATIONS,
    version_key="hub_schema_version",
    what="fieldgate hub database",
    adopt_foreign=False,
)


#: A batch's statistics per series and rollup bucket added to the rollups (when the batch's
#: readings of the series are all new: they went into a block).
ROLLUP_ADD = (
    "INSERT INTO rollups (series, bucket, min, max, sum, count) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (series, bucket) DO UPDATE SET min = min(rollups.min, excluded.min), "
    "max = max(rollups.max, excluded.max), sum = rollups.sum + excluded.sum, "
    "count = rollups.count + excluded.count"
)
#: The blocks of a series that may hold readings in [start, end): from the one holding
#: ``start`` (the last to begin at or before it: blocks never overlap), by the key.
#: ``?``: series, series, start, start, end, start.
BLOCKS_IN = (
    "k.series = ? AND k.first_ts >= COALESCE((SELECT first_ts FROM blocks WHERE series = ? "
    "AND first_ts <= ? ORDER BY first_ts DESC LIMIT 1), ?) AND k.first_ts < ? "
    "AND k.last_ts >= ?"
)
#: A series' blocks that a condition selects, exploded into samples (then deleted).
EXPLODE = (
    "INSERT INTO samples (series, ts, value, batch) "
    f"SELECT k.series, {POINT_TS}, {POINT_VALUE}, k.batch FROM blocks k, {POINTS} "
    "WHERE k.series = ? AND {where}"
)


class _Staged(NamedTuple):
    """A batch staged by :meth:`SqliteHubStorage._stage`."""

    ids: dict[tuple[str, str], int]  # (device, metric) -> series id (or provisional)
    new: dict[tuple[str, str], int]  # the series not in the database: provisional ids
    seen: int  # readings in the batch
    cut: Cut


class SqliteHubStorage(SqlHubStorage):
    """:class:`~fieldgate.hub.storage.HubStorage` over one SQLite file."""

    #: Readings fetched per query when streaming (each chunk is its own short read), and
    #: gathered per series before they are inserted.
    CHUNK = 25_000

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout_ms: int = 60000):
        super().__init__()
        self.path = Path(path)
        self.created = not self.path.exists()
        self.conn = store.open_database(
            path,
            HUB_SCHEMA,
            label="hub database",
            create=create,
            busy_timeout_ms=busy_timeout_ms,
            check_same_thread=False,
        )
        # the samples index grows with every gateway: keep its hot pages in memory
        self.conn.execute("PRAGMA cache_size = -65536")
        #: The batch being ingested: the series whose readings were merged into samples, and
        #: the rollup statistics of the others (stored as blocks).
        self._merged: set[int] = set()
        self._rollups: list[tuple[int, int, float, float, float, int]] = []

    _ingest_lock: int | None = None

    def _x(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params)

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def _tx(self) -> AbstractContextManager[Any]:
        return store.transaction(self.conn)

    @contextmanager
    def _ingest_tx(self) -> Iterator[Any]:
        # the lock file's own open file description: threads of one process (each with its
        # own storage object) exclude each other too. Read-only is enough for flock, so a
        # file root created (``hub import`` as root) still serves the hub's own user; root
        # hands a new one to the database's owner, as SQLite does with its WAL.
        if self._ingest_lock is None:
            fd = os.open(f"{self.path}-ingest", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if os.geteuid() == 0:
                st = self.path.stat()
                os.fchown(fd, st.st_uid, st.st_gid)
            self._ingest_lock = fd
        fcntl.flock(self._ingest_lock, fcntl.LOCK_EX)
        try:
            with store.transaction(self.conn) as conn:
                yield conn
        finally:
            fcntl.flock(self._ingest_lock, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._ingest_lock is not None:
            os.close(self._ingest_lock)
            self._ingest_lock = None
        super().close()

    def _stage(self, serial: str, rows: Readings) -> tuple[_Staged, int]:
        # Before the lock (no transaction): the readings as one Table, their names checked
        # once per distinct (device, metric), grouped per series and cut into blocks and
        # rollup statistics (:func:`fieldgate.hub.table.cut_blocks`). Series new to the
        # database get provisional negative ids until they are created inside the batch's
        # transaction.
        table = readings_table(rows)
        pairs, index = pairs_of(table)
        ids = dict(self._series_ids.get(serial, ()))
        new: dict[tuple[str, str], int] = {}
        for pair in pairs:
            if pair not in ids:
                known = self._known_series(serial, *pair)
                if known is None:
                    known = new[pair] = -(len(new) + 1)
                ids[pair] = known
        cut = cut_blocks(table, pa.array([ids[p] for p in pairs], pa.int64()), index, ROLLUP_MS)
        return _Staged(ids, new, table.num_rows, cut), table.num_rows

    def _known_series(self, serial: str, device: str, metric: str) -> int | None:
        """The id of a series the database holds (committed: it never goes away), or None;
        the names are checked first."""
        check_names(device, metric)
        row = self.conn.execute(
            "SELECT id FROM series WHERE serial = ? AND device = ? AND metric = ?",
            (serial, device, metric),
        ).fetchone()
        return None if row is None else int(row[0])

    def _insert_rows(
        self, serial: str, seq: int, staged: _Staged, ids: dict[tuple[str, str], int]
    ) -> tuple[int, dict[int, tuple[int, int, int]]]:
        # A series' readings that all come after its last one held (series.last_ts is
        # exact; nearly always) become one block, and their statistics are added to the
        # rollups. Otherwise (late or overlapping readings, a batch sent again) the
        # series' blocks that overlap the span of its readings in the batch are exploded
        # into samples, the readings not held go into samples, and the rollups of their
        # span are rebuilt.
        conn = self.conn
        ids.update(staged.ids)
        real: dict[int, int] = {}
        for pair, tmp in sorted(staged.new.items()):
            ids[pair] = real[tmp] = self._series_id(serial, *pair)
        last = dict(conn.execute("SELECT id, last_ts FROM series WHERE serial = ?", (serial,)))
        per_series: dict[int, tuple[int, int, int]] = {}
        blocks = []
        self._merged = set()
        for run in staged.cut.runs:
            sid = real.get(run.series, run.series)
            held = last.get(sid)
            if held is None or run.first_ts > held:
                base = run.first_ts  # the run's points are offsets from its first ts
                blocks.append(
                    (sid, base, run.last_ts, run.count, seq, run.last_value, base, run.points)
                )
                per_series[sid] = (run.count, run.first_ts, run.last_ts)
                continue
            got = self._merge(sid, seq, run, staged.cut)
            if got is not None:
                per_series[sid] = got
            self._merged.add(sid)
        conn.executemany(
            "INSERT INTO blocks (series, first_ts, last_ts, count, batch, last_value, base, "
            "points) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            blocks,
        )
        self._rollups = staged.cut.rollups
        if real or self._merged:  # rarely: provisional ids, series merged into samples
            self._rollups = [
                (real.get(s, s), *rest)
                for s, *rest in self._rollups
                if real.get(s, s) not in self._merged
            ]
        return staged.seen, per_series

    def _merge(self, sid: int, seq: int, run: Run, cut: Cut) -> tuple[int, int, int] | None:
        """Store one series' readings of a batch that do not all come after its last one:
        the blocks that overlap their span exploded into samples (the others lie wholly
        before or after it, so samples and blocks still never overlap), then the readings
        not held inserted into samples. (new readings, first, last), or None: none was new."""
        self._explode(sid, "k.first_ts <= ? AND k.last_ts >= ?", (run.last_ts, run.first_ts))
        ts = cut.readings["ts"].slice(run.start, run.count).to_pylist()
        values = cut.readings["v"].slice(run.start, run.count).to_pylist()
        held = {
            t
            for (t,) in self.conn.execute(
                "SELECT ts FROM samples WHERE series = ? AND ts >= ? AND ts <= ?",
                (sid, run.first_ts, run.last_ts),
            )
        }
        fresh = [(sid, t, v, seq) for t, v in zip(ts, values, strict=True) if t not in held]
        if not fresh:
            return None
        self.conn.executemany(
            "INSERT INTO samples (series, ts, value, batch) VALUES (?, ?, ?, ?)", fresh
        )
        return len(fresh), fresh[0][1], fresh[-1][1]

    def _explode(self, sid: int, where: str, params: Sequence[Any]) -> None:
        """Move a series' blocks that ``where`` selects (over ``k``) into samples."""
        self.conn.execute(EXPLODE.format(where=where), (sid, *params))
        self.conn.execute(
            f"DELETE FROM blocks WHERE rowid IN (SELECT k.rowid FROM blocks k "
            f"WHERE k.series = ? AND {where})",
            (sid, *params),
        )

    def _add_rollups(self, per_series: dict[int, tuple[int, int, int]]) -> None:
        """The statistics of the series stored as blocks are added to the rollups; the
        buckets of the merged ones' new readings are rebuilt."""
        self.conn.executemany(ROLLUP_ADD, self._rollups)
        super()._add_rollups({s: v for s, v in per_series.items() if s in self._merged})

    def _points(self, series_id: int, start: int, end: int) -> tuple[str, tuple[Any, ...]]:
        return (
            f"{SAMPLE_POINTS} UNION ALL SELECT ts, value FROM "
            f"(SELECT {POINT_TS} AS ts, {POINT_VALUE} AS value FROM blocks k, {POINTS} "
            f"WHERE {BLOCKS_IN}) WHERE ts >= ? AND ts < ?",
            (series_id, start, end, series_id, series_id, start, start, end, start, start, end),
        )

    #: A series' last reading is the last of its last block, or a sample.
    latest_value = (
        "COALESCE((SELECT value FROM samples WHERE series = s.id AND ts = s.last_ts), "
        "(SELECT last_value FROM blocks WHERE series = s.id AND first_ts <= s.last_ts "
        "AND last_ts = s.last_ts ORDER BY first_ts DESC LIMIT 1))"
    )

    def _raw_sums(
        self, series_id: int, span: tuple[int, int], every: int, origin: int
    ) -> list[tuple[int, float, float, float, int]]:
        # the samples by SQL; the blocks decoded and aggregated by pyarrow (json_each and
        # ->> in SQL cost 3.5x the samples' query per reading)
        out = self._sql_sums((SAMPLE_POINTS, (series_id, *span)), every, origin)
        for texts, bases in self._block_texts(series_id, *span):
            out += bucket_sums(*decode_points(texts, bases), span, every, origin)
        return out

    def _block_texts(
        self, series_id: int, start: int, end: int
    ) -> Iterator[tuple[list[str], list[int]]]:
        """The points and bases of the blocks that may hold readings in [start, end), a
        page of blocks at a time (each page its own short read), in time order."""
        while True:
            page = self.conn.execute(
                f"SELECT k.last_ts, k.points, k.base FROM blocks k WHERE {BLOCKS_IN} "
                "ORDER BY k.first_ts LIMIT ?",
                (series_id, series_id, start, start, end, start, self.BLOCK_PAGE),
            ).fetchall()
            if page:
                yield [points for _, points, _ in page], [base for _, _, base in page]
            if len(page) < self.BLOCK_PAGE:
                return
            start = page[-1][0] + 1

    #: Blocks read per query (a block holds one batch's readings of a series).
    BLOCK_PAGE = 32

    def readings(self, series_id: int, start: int, end: int) -> Iterator[tuple[int, float]]:
        # samples and blocks never hold the same reading: their two streams, merged
        blocks = self._block_points(series_id, start, end)
        if self.conn.execute(
            "SELECT 1 FROM samples WHERE series = ? AND ts >= ? AND ts < ? LIMIT 1",
            (series_id, start, end),
        ).fetchone():
            return heapq.merge(self._sample_pages(series_id, start, end), blocks)
        return blocks

    def _block_points(self, series_id: int, start: int, end: int) -> Iterator[tuple[int, float]]:
        for texts, bases in self._block_texts(series_id, start, end):
            ts, values = decode_points(texts, bases)
            keep = pc.and_(pc.greater_equal(ts, start), pc.less(ts, end))
            yield from zip(
                ts.filter(keep).to_pylist(), values.filter(keep).to_pylist(), strict=True
            )

    def _sample_pages(self, series_id: int, start: int, end: int) -> Iterator[tuple[int, float]]:
        # keyset pages: each a short read of its own, so a long download never pins the WAL
        while True:
            page = self.conn.execute(
                "SELECT ts, value FROM samples WHERE series = ? AND ts >= ? AND ts < ? "
                "ORDER BY ts LIMIT ?",
                (series_id, start, end, self.CHUNK),
            ).fetchall()
            yield from page
            if len(page) < self.CHUNK:
                return
            start = page[-1][0] + 1

    def _retention_end(self, series_id: int, cutoff: int, max_rows: int) -> int:
        # the block holding the cutoff (if any) becomes samples; before the cutoff, whole
        # blocks and samples are taken in time order while they fit in max_rows (the first
        # always, be it a block larger than that)
        self._explode(series_id, "k.first_ts < ? AND k.last_ts >= ?", (cutoff, cutoff))
        items = heapq.merge(
            self.conn.execute(
                "SELECT first_ts, count FROM blocks WHERE series = ? AND first_ts < ? "
                "ORDER BY first_ts LIMIT ?",
                (series_id, cutoff, max_rows + 1),
            ),
            self.conn.execute(
                "SELECT ts, 1 FROM samples WHERE series = ? AND ts < ? ORDER BY ts LIMIT ?",
                (series_id, cutoff, max_rows + 1),
            ),
        )
        taken = 0
        for ts, n in items:
            if taken and taken + n > max_rows:
                return int(ts)
            taken += n
        return cutoff

    def _delete_before(self, series_id: int, upto: int) -> tuple[int, int]:
        deleted, test = super()._delete_before(series_id, upto)
        n, t = self.conn.execute(
            "SELECT COALESCE(SUM(k.count), 0), COALESCE(SUM(k.count * b.test), 0) "
            "FROM blocks k JOIN batches b ON b.seq = k.batch "
            "WHERE k.series = ? AND k.first_ts < ? AND k.last_ts < ?",
            (series_id, upto, upto),
        ).fetchone()
        self.conn.execute(
            "DELETE FROM blocks WHERE series = ? AND first_ts < ? AND last_ts < ?",
            (series_id, upto, upto),
        )
        return deleted + int(n), test + int(t)

    def _first_ts(self, series_id: int) -> int | None:
        first = self.conn.execute(
            "SELECT MIN(t) FROM (SELECT MIN(ts) AS t FROM samples WHERE series = ? "
            "UNION ALL SELECT MIN(first_ts) FROM blocks WHERE series = ?)",
            (series_id, series_id),
        ).fetchone()[0]
        return None if first is None else int(first)
