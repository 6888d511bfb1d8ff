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
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any

from fieldgate import store
from fieldgate.batchfile import Columns
from fieldgate.hub.sqlstore import READINGS_VIEW, SqlHubStorage

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

    def _insert_rows(
        self, serial: str, seq: int, chunks: Iterable[Columns], ids: dict[tuple[str, str], int]
    ) -> tuple[int, dict[int, tuple[int, int, int]]]:
        # Each chunk goes in with one executemany in arrival order, inside a savepoint: when
        # every reading was new (the change count says so; nearly always) the new readings
        # per series are the chunk's own counts. Otherwise (a reading already held) the
        # chunk is rolled back and inserted again series by series, each series' change
        # count being exactly how many of its readings were new. The series' first and last
        # ts are read from the samples index afterwards (two lookups per series).
        conn = self.conn
        insert = (
            "INSERT INTO samples (series, ts, value, batch) "  # noqa: S608 (an integer)
            f"VALUES (?, ?, ?, {int(seq)}) ON CONFLICT DO NOTHING"
        )
        new: Counter[int] = Counter()
        seen = 0
        for cols in chunks:
            sids = [*map(ids.__getitem__, self._pairs(serial, cols, ids))]
            seen += len(sids)
            conn.execute("SAVEPOINT chunk")
            before = conn.total_changes
            conn.executemany(insert, zip(sids, cols.ts, cols.values, strict=True))
            if conn.total_changes - before == len(sids):
                conn.execute("RELEASE chunk")
                new.update(sids)
            else:
                conn.execute("ROLLBACK TO chunk")
                conn.execute("RELEASE chunk")
                rows = sorted(zip(sids, cols.ts, cols.values, strict=True), key=itemgetter(0))
                start = 0
                for sid, n in sorted(Counter(sids).items()):
                    before = conn.total_changes
                    conn.executemany(insert, rows[start : start + n])
                    new[sid] += conn.total_changes - before
                    start += n
                del rows
            # freed before the next chunk is parsed, which then reuses the memory while
            # it is in the CPU's caches (holding it costs ~0.5 µs per reading)
            del cols, sids
        # one min() or max() per statement: SQLite answers each from the index's end
        span = (
            "SELECT (SELECT min(ts) FROM samples WHERE series = ?1), "
            "(SELECT max(ts) FROM samples WHERE series = ?1)"
        )
        return seen, {
            sid: (n, *conn.execute(span, (sid,)).fetchone()) for sid, n in new.items() if n
        }

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
