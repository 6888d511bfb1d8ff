"""The hub's PostgreSQL backend (psycopg 3), for fleets too large for one SQLite file.

``--db postgresql://user@host:port/dbname`` picks it (:mod:`fieldgate.hub.backends`); the
password comes from ``PGPASSWORD`` or ``~/.pgpass`` (libpq) or a ``--db-password-file``,
never from the URL. It implements :class:`fieldgate.hub.storage.HubStorage` with the shared
SQL of :mod:`fieldgate.hub.sqlstore` over the same tables as the SQLite backend; the schema
is versioned and migrated the same way (:data:`PG_SCHEMA`, :func:`migrate`), under an
advisory lock so that hubs starting together migrate once.

Ingest: the batch's readings are streamed with ``COPY`` into a temporary staging table,
then one ``INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING`` moves them into
``samples`` and counts the new rows per series exactly. Concurrency (READ COMMITTED): the
unique key of ``batches`` decides which of concurrent ingests of one batch stores it (the
others wait for it, then skip); a PIN is used by a conditional UPDATE of its row; key
issue locks the gateway's row. Raw readings are streamed from a server-side cursor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from fieldgate import store
from fieldgate.batchfile import Columns
from fieldgate.errors import FieldgateError
from fieldgate.hub.sqlstore import READINGS_VIEW, SqlHubStorage, check_device, check_metric
from fieldgate.store import now_ms

#: Schema migrations: version -> SQL that brings a hub database from version-1 to version.
#: (PostgreSQL's history starts with the tables SQLite's reached at its version 2.)
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (
        key   text COLLATE "C" PRIMARY KEY,
        value text NOT NULL
    );
    CREATE TABLE gateways (
        serial         text COLLATE "C" PRIMARY KEY,
        domain         text COLLATE "C" NOT NULL DEFAULT 'default',
        created_at     bigint NOT NULL,
        registered_at  bigint,
        last_seen      bigint,
        last_heartbeat bigint,
        last_status    text,                    -- JSON: the gateway's status --json
        last_batch_id  text COLLATE "C",
        rows           bigint NOT NULL DEFAULT 0,
        test_rows      bigint NOT NULL DEFAULT 0,
        batches        bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX gateways_domain ON gateways (domain);
    CREATE TABLE pins (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        serial     text COLLATE "C" NOT NULL,
        salt       bytea  NOT NULL,
        pin_hash   bytea  NOT NULL,             -- PBKDF2-SHA256 of the PIN
        created_at bigint NOT NULL,
        expires_at bigint NOT NULL,
        used_at    bigint
    );
    CREATE INDEX pins_serial ON pins (serial);
    CREATE TABLE gateway_keys (
        key_hash   text COLLATE "C" PRIMARY KEY,  -- SHA-256 hex of the key
        serial     text COLLATE "C" NOT NULL,
        created_at bigint NOT NULL,
        revoked_at bigint
    );
    CREATE INDEX gateway_keys_serial ON gateway_keys (serial) WHERE revoked_at IS NULL;
    CREATE TABLE batches (
        seq       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- arrival order
        serial    text COLLATE "C" NOT NULL,
        batch_id  text COLLATE "C" NOT NULL,
        state     text NOT NULL,                -- stored
        rows      bigint NOT NULL,
        new_rows  bigint NOT NULL,
        sha256    text,
        first_ts  bigint,
        last_ts   bigint,
        mode      text,
        type      text,
        test      integer NOT NULL DEFAULT 0,
        manifest  text,                         -- JSON, as the gateway sent it
        stored_at bigint NOT NULL,
        UNIQUE (serial, batch_id)
    );
    CREATE TABLE uploads (
        token_hash text COLLATE "C" PRIMARY KEY,  -- SHA-256 hex of the upload URL's token
        serial     text COLLATE "C" NOT NULL,
        batch_id   text COLLATE "C" NOT NULL,
        manifest   text NOT NULL,
        created_at bigint NOT NULL,
        expires_at bigint NOT NULL
    );
    CREATE TABLE series (
        id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        serial   text COLLATE "C" NOT NULL,
        device   text COLLATE "C" NOT NULL,
        metric   text COLLATE "C" NOT NULL,
        first_ts bigint,                        -- NULL when retention emptied it
        last_ts  bigint,
        count    bigint NOT NULL DEFAULT 0,
        UNIQUE (serial, device, metric)
    );
    CREATE INDEX series_first_ts ON series (first_ts) WHERE first_ts IS NOT NULL;
    CREATE TABLE samples (
        ts     bigint NOT NULL,                 -- UTC epoch milliseconds
        value  double precision NOT NULL,
        batch  bigint NOT NULL,                 -- batches.seq of the batch that stored it
        series integer NOT NULL,                -- series.id
        PRIMARY KEY (series, ts)
    );
    """
    + READINGS_VIEW
    + """;
    CREATE TABLE users (
        name          text COLLATE "C" PRIMARY KEY,
        password_hash text NOT NULL,            -- scrypt$n$r$p$salt$hash
        admin         integer NOT NULL DEFAULT 0,
        created_at    bigint NOT NULL,
        updated_at    bigint NOT NULL
    );
    CREATE TABLE user_domains (
        name   text COLLATE "C" NOT NULL,       -- users.name
        domain text COLLATE "C" NOT NULL,
        PRIMARY KEY (name, domain)
    );
    CREATE TABLE login_failures (
        key text COLLATE "C" NOT NULL,          -- user:<name> or addr:<client address>
        at  bigint NOT NULL
    );
    CREATE INDEX login_failures_key ON login_failures (key, at);
    CREATE INDEX login_failures_at ON login_failures (at);
    """,
    # 2: per series and ten minutes, the statistics of its readings (charts of long windows);
    # the brief of a gateway's last status (what the fleet page shows of it)
    2: """
    ALTER TABLE gateways ADD COLUMN last_brief text;   -- JSON: hub.overview.brief(status)
    CREATE TABLE rollups (
        series integer NOT NULL,                -- series.id
        bucket bigint  NOT NULL,                -- start of its ten minutes, epoch ms
        min    double precision NOT NULL,
        max    double precision NOT NULL,
        sum    double precision NOT NULL,
        count  bigint  NOT NULL,
        PRIMARY KEY (series, bucket)
    );
    INSERT INTO rollups (series, bucket, min, max, sum, count)
        SELECT series, (ts / 600000) * 600000, min(value), max(value), sum(value), count(*)
        FROM samples GROUP BY series, ts / 600000;
    """,
}

#: The hub database's schema on PostgreSQL: the same shape as SQLite's (fieldgate.store).
PG_SCHEMA = store.Schema(
    MIGRATIONS,
    version_key="hub_schema_version",
    what="fieldgate hub database",
    adopt_foreign=False,
)

#: pg_advisory_xact_lock key that serializes migrations ("fieldgat" in ASCII).
MIGRATION_LOCK = 0x6669656C64676174

#: How a staged reading is written for COPY (text format: backslash, tab, CR, LF escaped).
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def describe(url: str) -> str:
    """A URL as messages show it: without user information."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"postgresql://{host}{port}{parts.path}"


def connect(url: str, *, password_file: str | Path | None = None) -> psycopg.Connection[Any]:
    """An autocommit connection (transactions are explicit), or FieldgateError in one line."""
    if urlsplit(url).password is not None:
        raise FieldgateError(
            f"the database URL {describe(url)} contains a password; give it in "
            "--db-password-file, PGPASSWORD or ~/.pgpass instead (a URL shows up in ps)"
        )
    kwargs: dict[str, Any] = {}
    if password_file is not None:
        try:
            kwargs["password"] = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise FieldgateError(
                f"cannot read the database password file {password_file}: {exc.strerror}"
            ) from None
    try:
        conn = psycopg.connect(
            url,
            autocommit=True,
            application_name="fieldgate-hub",
            connect_timeout=10,
            **kwargs,
        )
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FieldgateError(
            f"cannot connect to the hub database {describe(url)}: {first}"
        ) from None
    return conn


def schema_version(conn: psycopg.Connection[Any], version_key: str) -> int:
    """The hub schema version recorded in ``meta`` (0 for a database without one)."""
    if conn.execute("SELECT to_regclass('meta')").fetchone()[0] is None:  # type: ignore[index]
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = %s", (version_key,)).fetchone()
    return int(row[0]) if row else 0


def migrate(
    conn: psycopg.Connection[Any], label: str, schema: store.Schema = PG_SCHEMA, *, create: bool
) -> int:
    """Bring ``schema`` up to date in one transaction (as :func:`fieldgate.store.migrate` does
    for SQLite); refuse a newer or a foreign database, and an empty one unless ``create``."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        current = schema_version(conn, schema.version_key)
        store.refuse_newer(current, schema, label)
        if current == schema.version:
            return current
        if current == 0:
            tables = conn.execute(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            ).fetchone()[0]  # type: ignore[index]
            if tables and not schema.adopt_foreign:
                raise FieldgateError(f"{label} is not a {schema.what}")
            if not create:
                raise FieldgateError(
                    f"{label} holds no hub tables yet; 'fieldgate hub serve' or --create "
                    "creates them"
                )
        for version in range(current + 1, schema.version + 1):
            conn.execute(schema.migrations[version].encode())  # a script: no parameters
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (schema.version_key, str(version)),
            )
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('created_at', %s) ON CONFLICT DO NOTHING",
            (str(now_ms()),),
        )
    return schema.version


_QMARK = re.compile(r"\?")


class PgHubStorage(SqlHubStorage):
    """:class:`~fieldgate.hub.storage.HubStorage` over a PostgreSQL database."""

    for_update = " FOR UPDATE"
    # conflicts with itself (one claim at a time) and with plain inserts and deletes
    lock_login_failures = "LOCK TABLE login_failures IN SHARE ROW EXCLUSIVE MODE"
    row_id = "ctid"
    least = "least"
    greatest = "greatest"
    #: Readings fetched per round trip when streaming from the server-side cursor.
    CHUNK = 10_000

    def __init__(
        self, url: str, *, create: bool = True, password_file: str | Path | None = None
    ) -> None:
        super().__init__()
        self.url = url
        self.conn = connect(url, password_file=password_file)
        self._sql: dict[str, str] = {}
        #: Whether the batch being ingested went in with the plain insert (and whose it is).
        self._staged_new, self._staged_serial = False, ""
        try:
            self.created = schema_version(self.conn, PG_SCHEMA.version_key) == 0
            migrate(self.conn, f"hub database {describe(url)}", create=create)
            # the staging table of ingest: one per connection, emptied by every commit
            self.conn.execute("SET temp_buffers = '64MB'")
            self.conn.execute(
                'CREATE TEMP TABLE stage (device text COLLATE "C", metric text COLLATE "C", '
                "ts bigint, value double precision) ON COMMIT DELETE ROWS"
            )
        except BaseException:
            self.conn.close()
            raise

    def _pg(self, sql: str) -> str:
        """The statement with psycopg's placeholders (the shared SQL uses ``?``)."""
        out = self._sql.get(sql)
        if out is None:
            assert "%" not in sql, sql
            out = self._sql[sql] = _QMARK.sub("%s", sql)
        return out

    def _x(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self._pg(sql), params)  # type: ignore[arg-type]

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(self._pg(sql), rows)  # type: ignore[arg-type]

    def _tx(self) -> AbstractContextManager[Any]:
        return self.conn.transaction()

    def _insert_rows(
        self, serial: str, seq: int, chunks: Iterable[Columns], ids: dict[tuple[str, str], int]
    ) -> tuple[int, dict[int, tuple[int, int, int]]]:
        seen = 0
        devices: dict[str, str] = {}  # name -> as COPY reads it (checked once per name)
        metrics: dict[str, str] = {}
        line = "{}\t{}\t{}\t{!r}\n".format
        with self.conn.cursor() as cur:
            with cur.copy("COPY stage (device, metric, ts, value) FROM STDIN") as copy:
                for cols in chunks:
                    for name in set(cols.devices).difference(devices):
                        check_device(name)
                        devices[name] = name.translate(_COPY_ESCAPES)
                    for name in set(cols.metrics).difference(metrics):
                        check_metric(name)
                        metrics[name] = name.translate(_COPY_ESCAPES)
                    copy.write(
                        "".join(
                            map(
                                line,
                                map(devices.__getitem__, cols.devices),
                                map(metrics.__getitem__, cols.metrics),
                                cols.ts,
                                cols.values,
                            )
                        )
                    )
                    seen += len(cols.ts)
                    del cols  # freed before the next chunk is parsed (see sqlite_storage)
            # new series first, in a fixed order (concurrent ingests lock them alike)
            cur.execute(
                "INSERT INTO series (serial, device, metric, count) "
                "SELECT %s, device, metric, 0 FROM (SELECT DISTINCT device, metric FROM stage) d "
                "ORDER BY device, metric ON CONFLICT DO NOTHING",
                (serial,),
            )
            per_series = self._move_staged(cur, serial, seq)
        return seen, per_series

    def _move_staged(self, cur: Any, serial: str, seq: int) -> dict[int, tuple[int, int, int]]:
        """Insert the staged readings into samples; per series (new rows, first, last).

        A plain INSERT costs about half of INSERT … ON CONFLICT DO NOTHING (measured:
        bench/hub). Almost always no staged reading is held yet, so the plain insert is
        tried first, in a savepoint; if one is (a re-sent reading, the same reading in the
        batch twice, or one another transaction is storing right now), the savepoint is
        rolled back and the batch goes in with ON CONFLICT DO NOTHING, which skips them."""
        select = (
            "SELECT s.id, t.ts, t.value, %s FROM stage t"
            " JOIN series s ON s.serial = %s AND s.device = t.device AND s.metric = t.metric"
        )
        self._staged_new, self._staged_serial = False, serial
        try:
            with self.conn.transaction():
                cur.execute(
                    f"INSERT INTO samples (series, ts, value, batch) {select}", (seq, serial)
                )
            self._staged_new = True
        except psycopg.errors.UniqueViolation:
            cur.execute(
                f"WITH new AS (INSERT INTO samples (series, ts, value, batch) {select}"  # noqa: S608
                " ON CONFLICT DO NOTHING RETURNING series, ts) "
                "SELECT series, count(*), min(ts), max(ts) FROM new GROUP BY series",
                (seq, serial),
            )
        else:
            cur.execute(
                "SELECT s.id, count(*), min(t.ts), max(t.ts) FROM stage t"
                " JOIN series s ON s.serial = %s AND s.device = t.device AND s.metric = t.metric"
                " GROUP BY s.id",
                (serial,),
            )
        return {int(s): (int(n), int(lo), int(hi)) for s, n, lo, hi in cur.fetchall()}

    def _add_rollups(self, per_series: dict[int, tuple[int, int, int]]) -> None:
        """When every staged reading was new (the plain insert went through), the staged
        rows are exactly what the batch added: their statistics per rollup bucket are added
        to the rollups (in (series, bucket) order: the lock order). Otherwise the touched
        buckets are rebuilt from the samples."""
        if not self._staged_new:
            super()._add_rollups(per_series)
            return
        self.conn.execute(
            "INSERT INTO rollups (series, bucket, min, max, sum, count) "
            "SELECT s.id, (t.ts / 600000) * 600000 AS slot, min(t.value), max(t.value), "
            "sum(t.value), count(*) FROM stage t JOIN series s ON s.serial = %s "
            "AND s.device = t.device AND s.metric = t.metric "
            "GROUP BY s.id, slot ORDER BY s.id, slot "
            "ON CONFLICT (series, bucket) DO UPDATE SET min = least(rollups.min, excluded.min), "
            "max = greatest(rollups.max, excluded.max), sum = rollups.sum + excluded.sum, "
            "count = rollups.count + excluded.count",
            (self._staged_serial,),
        )

    def readings(self, series_id: int, start: int, end: int) -> Iterator[tuple[int, float]]:
        # a server-side cursor inside a read-only transaction: the rows come in chunks; the
        # transaction ends when the iterator is exhausted or closed
        with (
            self.conn.transaction(),
            self.conn.cursor(name="fieldgate_readings") as cur,
        ):
            cur.itersize = self.CHUNK
            cur.execute(
                "SELECT ts, value FROM samples WHERE series = %s AND ts >= %s AND ts < %s "
                "ORDER BY ts",
                (series_id, start, end),
            )
            yield from cur
