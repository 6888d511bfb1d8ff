"""The hub's default storage backend: one SQLite file (WAL, synchronous=FULL) for all gateways.

It implements :class:`fieldgate.hub.storage.HubStorage` with the shared SQL of
:mod:`fieldgate.hub.sqlstore`; connections, migrations and transactions come from
:mod:`fieldgate.store`, like the gateway's own store. Every write is a ``BEGIN IMMEDIATE``
transaction, so writers of several processes take turns (busy timeout 60 s) and a batch,
a PIN or an upload token is decided by exactly one of them.

Ingests queue on an exclusive ``flock`` of ``<db>-ingest`` before they begin: the kernel
wakes the next one the moment the previous one lets go, where SQLite's busy handler polls
in sleeps of up to 100 ms and leaves the write lock idle in between (with four uploads at
once that cost about a sixth of the hub's ingest rate). Short writes keep the busy timeout.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from fieldgate import store
from fieldgate.batchfile import Columns
from fieldgate.hub.sqlstore import READINGS_VIEW, SqlHubStorage, check_names

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
    """  # noqa: S608 (constant SQL: the view's definition joins it)
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
}

#: The hub database's schema: its own version key, and a foreign database is refused.
HUB_SCHEMA = store.Schema(
    MIGRATIONS,
    version_key="hub_schema_version",
    what="fieldgate hub database",
    adopt_foreign=False,
)


#: The connection's staging tables (temporary: its own, in no other connection's way).
STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage (
    series INTEGER NOT NULL,                    -- series.id, or provisional (< 0)
    ts     INTEGER NOT NULL,
    value  REAL    NOT NULL
);
CREATE TEMP TABLE IF NOT EXISTS stage_rollups (
    series   INTEGER NOT NULL,
    bucket   INTEGER NOT NULL,
    min      REAL    NOT NULL,
    max      REAL    NOT NULL,
    sum      REAL    NOT NULL,
    count    INTEGER NOT NULL
);
CREATE TEMP TABLE IF NOT EXISTS stage_series (
    tmp INTEGER PRIMARY KEY,                    -- a provisional id
    id  INTEGER NOT NULL                        -- the series' id
);
"""
#: The staging tables' page cache (KiB, negative): a batch of 50,000 readings stays in
#: memory; a larger one spills to a temporary file.
STAGE_CACHE = -16384
STAGE_INSERT = "INSERT INTO temp.stage (series, ts, value) VALUES (?, ?, ?)"
#: The staged readings' statistics per series and rollup bucket (ROLLUP_MS wide).
STAGE_ROLLUPS = (
    "INSERT INTO temp.stage_rollups "
    "SELECT series, (ts / 600000) * 600000 AS slot, MIN(value), MAX(value), SUM(value), "
    "COUNT(*) FROM temp.stage GROUP BY series, slot"
)
#: The staged statistics added to the rollups (when every staged reading was new).
ROLLUP_ADD = (
    "INSERT INTO rollups (series, bucket, min, max, sum, count) "
    "SELECT series, bucket, min, max, sum, count FROM temp.stage_rollups WHERE true "
    "ON CONFLICT (series, bucket) DO UPDATE SET min = min(rollups.min, excluded.min), "
    "max = max(rollups.max, excluded.max), sum = rollups.sum + excluded.sum, "
    "count = rollups.count + excluded.count"
)


class _Staged(NamedTuple):
    """A batch staged by :meth:`SqliteHubStorage._stage`."""

    ids: dict[tuple[str, str], int]  # (device, metric) -> series id (or provisional)
    new: dict[tuple[str, str], int]  # the series not in the database: provisional ids
    seen: int  # readings staged


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

    _ingest_lock: int | None = None
    _staging = False  # the connection's staging tables exist
    _all_new = False  # the batch being ingested stored every staged reading

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

    def _stage(self, serial: str, chunks: Iterator[Columns]) -> tuple[_Staged, int]:
        # Before the lock, in a transaction of the connection's own temporary tables only
        # (other writers are not held up): the readings are parsed (the batch's SHA-256
        # checked after the last one), their names checked once per distinct (device,
        # metric), staged as (series id, ts, value), and their statistics per series and
        # rollup bucket gathered. Series new to the database get provisional negative ids
        # until they are created inside the batch's transaction.
        conn = self.conn
        if not self._staging:
            conn.execute(f"PRAGMA temp.cache_size = {STAGE_CACHE}")
            conn.executescript(STAGING)
            self._staging = True
        ids = dict(self._series_ids.get(serial, ()))
        new: dict[tuple[str, str], int] = {}
        seen = 0
        conn.execute("DELETE FROM temp.stage")
        conn.execute("DELETE FROM temp.stage_rollups")
        conn.execute("BEGIN")
        try:
            for cols in chunks:
                sids = [*map(ids.get, zip(cols.devices, cols.metrics, strict=True))]
                if None in sids:
                    for pair in dict.fromkeys(zip(cols.devices, cols.metrics, strict=True)):
                        if pair not in ids:
                            known = self._known_series(serial, *pair)
                            if known is None:
                                known = new[pair] = -(len(new) + 1)
                            ids[pair] = known
                    sids = [*map(ids.__getitem__, zip(cols.devices, cols.metrics, strict=True))]
                seen += len(sids)
                conn.executemany(STAGE_INSERT, zip(sids, cols.ts, cols.values, strict=True))
                # freed before the next chunk is parsed, which then reuses the memory while
                # it is in the CPU's caches (holding it costs ~0.5 µs per reading)
                del cols, sids
            conn.execute(STAGE_ROLLUPS)
            conn.execute("COMMIT")
        except BaseException:
            store.rollback_quietly(conn)
            raise
        return _Staged(ids, new, seen), seen

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
        # One INSERT … SELECT moves the staged readings into samples, skipping those held.
        # When it stored every staged reading (the change count says so; nearly always) the
        # staged statistics are exactly what the batch added. Otherwise (a reading already
        # held, or one twice in the batch) the new readings per series are counted from
        # samples by this batch's seq, and the rollups of their span are rebuilt.
        conn = self.conn
        ids.update(staged.ids)
        if staged.new:
            for pair, tmp in sorted(staged.new.items()):
                ids[pair] = self._series_id(serial, *pair)
                conn.execute(
                    "INSERT INTO temp.stage_series (tmp, id) VALUES (?, ?)", (tmp, ids[pair])
                )
            for table in ("stage", "stage_rollups"):
                conn.execute(
                    f"UPDATE temp.{table} SET series = "  # noqa: S608 (constant names)
                    "(SELECT id FROM temp.stage_series WHERE tmp = series) WHERE series < 0"
                )
            conn.execute("DELETE FROM temp.stage_series")
        before = conn.total_changes
        conn.execute(
            "INSERT INTO samples (series, ts, value, batch) "  # noqa: S608 (an integer)
            f"SELECT series, ts, value, {int(seq)} FROM temp.stage WHERE true "
            "ON CONFLICT DO NOTHING"
        )
        self._all_new = conn.total_changes - before == staged.seen
        if self._all_new:
            # the series' whole span, two lookups each (the span of the new readings would
            # cost two more aggregates per reading; only a rebuild, the other branch, needs it)
            rows = conn.execute(
                "SELECT series, SUM(count), "
                "(SELECT min(ts) FROM samples WHERE series = r.series), "
                "(SELECT max(ts) FROM samples WHERE series = r.series) "
                "FROM temp.stage_rollups r GROUP BY series"
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT t.series, COUNT(DISTINCT t.ts), MIN(t.ts), MAX(t.ts) FROM temp.stage t "
                "JOIN samples r ON r.series = t.series AND r.ts = t.ts WHERE r.batch = ? "
                "GROUP BY t.series",
                (seq,),
            ).fetchall()
        conn.execute("DELETE FROM temp.stage")
        return staged.seen, {int(s): (int(n), int(lo), int(hi)) for s, n, lo, hi in rows}

    def _add_rollups(self, per_series: dict[int, tuple[int, int, int]]) -> None:
        """When every staged reading was new, the staged statistics are added to the
        rollups; otherwise the new readings' buckets are rebuilt from the samples."""
        if self._all_new:
            self.conn.execute(ROLLUP_ADD)
        else:
            super()._add_rollups(per_series)

    def readings(self, series_id: int, start: int, end: int) -> Iterator[tuple[int, float]]:
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
