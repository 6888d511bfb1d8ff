"""The local store: one plain SQLite file in WAL mode that the ``sqlite3`` shell can read.

Tables (docs/contract.md §5):
- ``readings``: one row per (device, ts, metric); a batch holds an id range of them
  (:mod:`fieldgate.membership`).
- ``rejected``: every message that could not be stored as readings, with the reason.
- ``batches``: batch files cut from the readings and their upload state.
- ``meta``: ``site_serial``, ``schema_version`` and other facts about the store.
- ``state``: small key/value facts the daemons publish for ``fieldgate status``.
- ``events``: operational events worth showing an operator (power, disk guard, exports).
- ``device_counts``, ``counts``, ``rejected_reasons``: what ``status`` counts (readings per
  device, unbatched readings, rejected messages in all and per reason), kept as rows are
  written and deleted, in the same transaction.

Commits use ``synchronous=FULL``: a reading acknowledged to the broker survives a power cut.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from fieldgate.errors import FieldgateError

log = logging.getLogger("fieldgate.store")

T = TypeVar("T")

#: Schema migrations: version -> SQL that brings a store from version-1 to version.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS readings (
        id          INTEGER PRIMARY KEY,
        device      TEXT    NOT NULL,
        ts          INTEGER NOT NULL,            -- UTC epoch milliseconds
        metric      TEXT    NOT NULL,
        value       REAL    NOT NULL,
        received_at INTEGER NOT NULL,            -- UTC epoch milliseconds
        source      TEXT    NOT NULL,            -- mqtt, poll:<node>, restore:<file>
        batch_id    TEXT,                        -- NULL until cut into a batch
        UNIQUE (device, ts, metric)
    );
    CREATE INDEX IF NOT EXISTS readings_unbatched ON readings (id) WHERE batch_id IS NULL;
    CREATE INDEX IF NOT EXISTS readings_batch ON readings (batch_id) WHERE batch_id IS NOT NULL;
    CREATE TABLE IF NOT EXISTS rejected (
        id          INTEGER PRIMARY KEY,
        received_at INTEGER NOT NULL,            -- UTC epoch milliseconds
        source      TEXT    NOT NULL,
        topic       TEXT,
        payload     BLOB,
        reason      TEXT    NOT NULL
    );
    CREATE TABLE IF NOT EXISTS batches (
        batch_id    TEXT PRIMARY KEY,
        state       TEXT    NOT NULL,            -- pending, uploaded
        rows        INTEGER NOT NULL,
        sha256      TEXT    NOT NULL,            -- of readings.csv
        first_ts    INTEGER,
        last_ts     INTEGER,
        first_id    INTEGER,
        last_id     INTEGER,
        mode        TEXT    NOT NULL,
        type        TEXT    NOT NULL,
        file        TEXT,
        created_at  INTEGER NOT NULL,
        uploaded_at INTEGER,
        attempts    INTEGER NOT NULL DEFAULT 0,
        last_error  TEXT
    );
    CREATE TABLE IF NOT EXISTS state (
        key        TEXT PRIMARY KEY,
        value      TEXT    NOT NULL,
        updated_at INTEGER NOT NULL              -- UTC epoch milliseconds
    );
    CREATE TABLE IF NOT EXISTS events (
        id      INTEGER PRIMARY KEY,
        at      INTEGER NOT NULL,                -- UTC epoch milliseconds
        kind    TEXT    NOT NULL,
        message TEXT    NOT NULL
    );
    """,
    # Batch membership by id range (fieldgate.membership): readings lose their per-row
    # batch_id and get AUTOINCREMENT ids, never reused. The readings of each batch take
    # consecutive new ids in cutting order (batch ids sort so), the unbatched ones follow;
    # each batch's first_id/last_id become its new range (an empty one when its readings
    # are gone). A reading naming no recorded batch counts as unbatched (sent again; the
    # hub keeps it once).
    2: """
    CREATE TABLE readings_v2 (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: see membership
        device      TEXT    NOT NULL,
        ts          INTEGER NOT NULL,            -- UTC epoch milliseconds
        metric      TEXT    NOT NULL,
        value       REAL    NOT NULL,
        received_at INTEGER NOT NULL,            -- UTC epoch milliseconds
        source      TEXT    NOT NULL,            -- mqtt, poll:<node>, restore:<file>
        UNIQUE (device, ts, metric)
    );
    UPDATE batches SET first_id = r.upto - r.n + 1, last_id = r.upto
    FROM (
        SELECT batch_id, n, SUM(n) OVER (ORDER BY batch_id) AS upto
        FROM (
            SELECT b.batch_id, COUNT(r.id) AS n
            FROM batches b LEFT JOIN readings r ON r.batch_id = b.batch_id
            GROUP BY b.batch_id
        )
    ) AS r
    WHERE r.batch_id = batches.batch_id;
    INSERT INTO readings_v2 (device, ts, metric, value, received_at, source)
    SELECT r.device, r.ts, r.metric, r.value, r.received_at, r.source
    FROM readings r JOIN batches b ON b.batch_id = r.batch_id
    ORDER BY r.batch_id, r.id;
    INSERT INTO readings_v2 (device, ts, metric, value, received_at, source)
    SELECT device, ts, metric, value, received_at, source FROM readings r
    WHERE NOT EXISTS (SELECT 1 FROM batches b WHERE b.batch_id = r.batch_id)
    ORDER BY id;
    DROP TABLE readings;
    ALTER TABLE readings_v2 RENAME TO readings;
    CREATE INDEX batches_last_id ON batches (last_id);
    """,
    # Counters for ``fieldgate status`` (fieldgate.status), so that it costs the same on a
    # store of any size: kept in the transaction that writes or deletes what they count
    # (insert_reading_rows, count_new_readings, insert_rejected, batches._record,
    # membership.delete_readings_of, prune), filled here from the rows there are.
    3: """
    CREATE TABLE device_counts (
        device   TEXT PRIMARY KEY,
        readings INTEGER NOT NULL                -- rows of readings of this device
    ) WITHOUT ROWID;
    CREATE TABLE counts (
        name TEXT PRIMARY KEY,                   -- unbatched, rejected
        n    INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE rejected_reasons (
        reason TEXT PRIMARY KEY,
        n      INTEGER NOT NULL                  -- rows of rejected with this reason
    );
    CREATE INDEX rejected_reasons_n ON rejected_reasons (n);
    CREATE INDEX batches_state ON batches (state, created_at);
    INSERT INTO device_counts (device, readings)
    SELECT device, COUNT(*) FROM readings GROUP BY device;
    INSERT INTO counts (name, n) VALUES
    ('unbatched', (
        SELECT COUNT(*) FROM readings
        WHERE id > (SELECT COALESCE(MAX(last_id), 0) FROM batches)
    )),
    ('rejected', (SELECT COUNT(*) FROM rejected));
    INSERT INTO rejected_reasons (reason, n) SELECT reason, COUNT(*) FROM rejected GROUP BY reason;
    """,
}


#: The store schema this fieldgate writes.
SCHEMA_VERSION = max(MIGRATIONS)


def now_ms() -> int:
    """The current UTC time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def iso_utc(ms: int) -> str:
    """An epoch-milliseconds time as RFC 3339 UTC to the second (``2026-11-21T10:15:00Z``)."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_now() -> str:
    """The current UTC time as :func:`iso_utc` writes it."""
    return iso_utc(now_ms())


def age_text(secs: float | None) -> str:
    """An age as people read it: ``42 s``, ``5 min``, ``3 h``, ``2 d``; ``never``."""
    if secs is None:
        return "never"
    if secs < 120:
        return f"{secs:.0f} s"
    if secs < 7200:
        return f"{secs / 60:.0f} min"
    if secs < 172800:
        return f"{secs / 3600:.0f} h"
    return f"{secs / 86400:.0f} d"


@dataclass(frozen=True)
class Schema:
    """A database's migrations and the ``meta`` key that records how far it is migrated.

    ``migrations[v]`` is the SQL that brings the database from version v-1 to v. With
    ``adopt_foreign`` false, a database that holds tables but no ``meta`` table (another
    program's) is refused instead of getting this schema's tables added.
    """

    migrations: Mapping[int, str]
    version_key: str = "schema_version"
    what: str = "fieldgate store"
    adopt_foreign: bool = True

    @property
    def version(self) -> int:
        return max(self.migrations)


#: The gateway store's schema.
STORE_SCHEMA = Schema(MIGRATIONS)


def immutable_uri(path: str | Path) -> str:
    """A read-only URI that makes SQLite create nothing (no -wal, no -shm) beside the file:
    for a finished copy, an export on a drive, a file being restored."""
    return f"file:{quote(str(Path(path).resolve()))}?mode=ro&immutable=1"


def connect(
    path: str | Path,
    *,
    busy_timeout_ms: int = 30000,
    readonly: bool = False,
    immutable: bool = False,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """A connection with the pragmas every fieldgate process uses (no schema work).

    Writable connections use WAL and ``synchronous=FULL``; ``readonly`` ones read a live
    database (``query_only``: in WAL mode they never block a writer); ``immutable`` ones read
    a file nobody writes (see :func:`immutable_uri`).
    The connection is in autocommit mode; use :func:`transaction` for atomic work.
    """
    if immutable:
        uri = immutable_uri(path)
    else:
        # URI filenames, so that ATTACH on this connection can open other files read-only.
        mode = "ro" if readonly else "rwc"
        uri = f"file:{quote(str(Path(path).resolve()))}?mode={mode}"
    conn = sqlite3.connect(
        uri,
        uri=True,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,
        check_same_thread=check_same_thread,
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if readonly or immutable:
        conn.execute("PRAGMA query_only = ON")  # a reader never takes the write lock
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def read_store(
    path: str | Path,
    read: Callable[[sqlite3.Connection], T],
    *,
    busy_timeout_ms: int = 30000,
) -> T:
    """``read(conn)`` on a connection that writes nothing, not even beside the file: for
    ``status``, which must work on a full disk and while no daemon runs.

    A plain ``mode=ro`` connection to a WAL database creates ``-wal`` and ``-shm`` when they
    are missing (and fails with "disk I/O error" when the disk is full), so: when the
    write-ahead log holds frames (a writer has the store open, or one was killed), read
    through it read-only (its ``-shm`` exists then); when it holds none, the file alone
    holds every commit: read it immutable. Should a writer write to the log during an
    immutable read, the read is done again through the log.
    """
    wal = Path(f"{path}-wal")
    for _ in range(3):
        live = _size(wal) > 0
        conn = connect(path, busy_timeout_ms=busy_timeout_ms, readonly=live, immutable=not live)
        try:
            result = read(conn)
        except sqlite3.DatabaseError:
            if live:
                raise
            continue  # the file changed under the immutable read: a writer checkpointed
        finally:
            conn.close()
        if live or _size(wal) == 0:
            return result
    conn = connect(path, busy_timeout_ms=busy_timeout_ms, readonly=True)
    try:
        return read(conn)
    finally:
        conn.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def connect_unjournaled(path: str | Path, *, vfs: str | None = None) -> sqlite3.Connection:
    """A connection to a new file that one writer fills in bulk (a snapshot being taken):
    no journal, no syncs, exclusive lock. The caller fsyncs the finished file.

    ``vfs``: the SQLite VFS to open it through (by name; default: the default VFS).
    """
    if vfs is None:
        conn = sqlite3.connect(str(path), isolation_level=None)
    else:
        uri = f"file:{quote(str(Path(path).resolve()))}?vfs={quote(vfs)}"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    return conn


def open_database(
    path: str | Path,
    schema: Schema,
    *,
    label: str,
    create: bool = True,
    busy_timeout_ms: int = 30000,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """Open (creating and migrating as needed) a database of ``schema`` at ``path``.

    ``label`` names the kind of database in messages (``store``, ``hub database``); every
    failure is a FieldgateError naming it and the path.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise FieldgateError(f"{label} {path} does not exist")
        if not path.parent.is_dir():
            raise FieldgateError(f"{label} directory {path.parent} does not exist")
    conn = None
    try:
        conn = connect(path, busy_timeout_ms=busy_timeout_ms, check_same_thread=check_same_thread)
        migrate(conn, str(path), schema)
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        raise FieldgateError(f"{label} {path}: {exc}") from None
    except FieldgateError:
        if conn is not None:
            conn.close()
        raise
    return conn


def open_store(
    path: str | Path,
    site_serial: str | None = None,
    *,
    busy_timeout_ms: int = 30000,
    create: bool = True,
) -> sqlite3.Connection:
    """Open (creating and migrating as needed) the gateway store at ``path``.

    When ``site_serial`` is given, a store that belongs to another site is refused.
    """
    conn = open_database(
        path, STORE_SCHEMA, label="store", create=create, busy_timeout_ms=busy_timeout_ms
    )
    if site_serial is not None:
        try:
            _claim_site(conn, str(path), site_serial)
        except (sqlite3.DatabaseError, FieldgateError) as exc:
            conn.close()
            if isinstance(exc, FieldgateError):
                raise
            raise FieldgateError(f"store {path}: {exc}") from None
    return conn


def schema_version(conn: sqlite3.Connection, version_key: str = "schema_version") -> int:
    """The schema version recorded under ``version_key`` (0 for an empty database)."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (version_key,)).fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection, label: str = "store", schema: Schema = STORE_SCHEMA) -> int:
    """Bring ``schema`` up to date in one transaction; refuse a newer or a foreign database.

    ``label`` names the database in messages (its path).
    """
    current = schema_version(conn, schema.version_key)
    refuse_newer(current, schema, label)
    if current == schema.version:
        return current
    if current == 0 and not schema.adopt_foreign and _is_foreign(conn):
        raise FieldgateError(f"{label} is not a {schema.what}")
    with transaction(conn):
        for version in range(current + 1, schema.version + 1):
            for statement in _statements(schema.migrations[version]):
                conn.execute(statement)
            set_meta(conn, schema.version_key, str(version))
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', ?)", (str(now_ms()),)
        )
    return schema.version


def refuse_newer(current: int, schema: Schema, label: str) -> None:
    """FieldgateError when a database's schema version ``current`` is newer than
    ``schema``'s (a later fieldgate wrote it): for every backend's migrate."""
    if current > schema.version:
        raise FieldgateError(
            f"{label} has schema version {current}, newer than this fieldgate supports "
            f"({schema.version}); upgrade fieldgate"
        )


def _is_foreign(conn: sqlite3.Connection) -> bool:
    """Tables, but no ``meta`` table: some other program's database."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return bool(tables) and "meta" not in tables


def _statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()


def _claim_site(conn: sqlite3.Connection, label: str, site_serial: str) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'site_serial'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('site_serial', ?)", (site_serial,))
    elif row[0] != site_serial:
        raise FieldgateError(
            f"store {label} belongs to site {row[0]}, but the configuration says site.serial is "
            f"{site_serial}; use 'fieldgate restore' to bring another site's data in"
        )


@contextmanager
def transaction(
    conn: sqlite3.Connection, *, immediate: bool = True
) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """Leave no transaction open after a failure (a failed COMMIT keeps it open in SQLite);
    never raises, the first failure is what matters."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        log.debug("rollback failed", exc_info=True)


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


Reading = tuple[str, int, str, float]
"""(device, ts epoch ms, metric, value)"""
ReadingRow = tuple[str, int, str, float, int, str]
"""(device, ts epoch ms, metric, value, received_at epoch ms, source): a ``readings`` row"""

#: One reading into ``readings``; one already stored (same device, ts, metric) is ignored.
INSERT_READING_SQL = (
    "INSERT OR IGNORE INTO readings (device, ts, metric, value, received_at, source) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
#: Readings per statement of :func:`insert_reading_rows` (a power of two: a remainder is
#: inserted with the smaller powers, so at most eight statements are ever prepared).
ROWS_PER_INSERT = 128
_ROW = "(?, ?, ?, ?, ?, ?)"
_INSERT_ROWS_SQL = {
    rows: INSERT_READING_SQL[: -len(_ROW)] + ", ".join([_ROW] * rows)
    for rows in (128, 64, 32, 16, 8, 4, 2, 1)
}


#: :func:`insert_device_readings`' statement up to its rows: the device, time and source bound
#: once (``?1``-``?3``), then metric, value and received_at per reading.
_DEVICE_ROWS_HEAD = (
    "INSERT OR IGNORE INTO readings (device, ts, metric, value, received_at, source) "
    "SELECT ?1, ?2, column1, column2, column3, ?3 FROM (VALUES "
)


@functools.lru_cache(maxsize=ROWS_PER_INSERT)
def _device_rows_sql(rows: int) -> str:
    """:func:`insert_device_readings`' statement for ``rows`` readings (one per size: an
    answer's readings go in one statement)."""
    values = ", ".join(f"(?{4 + 3 * i}, ?{5 + 3 * i}, ?{6 + 3 * i})" for i in range(rows))
    return _DEVICE_ROWS_HEAD + values + ")"


def insert_reading_rows(conn: sqlite3.Connection, flat: list[object]) -> int:
    """Insert readings given as one flat list, six values per reading (device, ts, metric,
    value, received_at, source), in that order; ones already stored are ignored.

    Many readings per ``INSERT`` statement: SQLite's work per statement (the
    ``AUTOINCREMENT`` counter, the statement journal) is then paid once per
    :data:`ROWS_PER_INSERT` readings instead of once per reading, about half the CPU of one
    statement per reading (docs/benchmarks.md). Returns how many rows were new. Does not
    commit: call inside :func:`transaction`.
    """
    end = len(flat)
    if end % 6:
        raise ValueError(f"{end} values are not whole readings of six")
    before = conn.total_changes
    width = 6 * ROWS_PER_INSERT
    pos = end - end % width
    if pos:
        conn.executemany(
            _INSERT_ROWS_SQL[ROWS_PER_INSERT], [flat[i : i + width] for i in range(0, pos, width)]
        )
    rows = ROWS_PER_INSERT // 2
    while pos < end:
        size = 6 * rows
        if end - pos >= size:
            conn.execute(_INSERT_ROWS_SQL[rows], flat[pos : pos + size])
            pos += size
        rows //= 2
    new = conn.total_changes - before
    if new:
        # every reading new (the usual case): the devices are in the list already
        count_new_readings(conn, new, Counter(flat[0::6]) if 6 * new == end else None)
    return new


def insert_device_readings(
    conn: sqlite3.Connection,
    device: str,
    ts: int,
    source: str,
    rows: Sequence[tuple[str, float, int]],
    *,
    count: bool = True,
) -> int:
    """Insert readings of one ``device`` at one time ``ts`` from one ``source`` (a poll of a
    device), each ``(metric, value, received_at)``; ones already stored are ignored. The
    same rows as :func:`insert_reading_rows` writes, with the three values they share bound
    once per statement of up to :data:`ROWS_PER_INSERT` readings: about a quarter less CPU
    per reading (docs/benchmarks.md, "Modbus"). Returns how many rows were new.
    ``count=False``: the caller counts them with :func:`count_new_readings` in the same
    transaction (once for many small inserts). Does not commit: call inside
    :func:`transaction`.
    """
    before = conn.total_changes
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        args: list[object] = [device, ts, source]
        for row in chunk:
            args += row
        conn.execute(_device_rows_sql(len(chunk)), args)
    new = conn.total_changes - before
    if new and count:
        count_new_readings(conn, new, {device: new})
    return new


_ADD_DEVICE_COUNT = (
    "INSERT INTO device_counts (device, readings) VALUES (?, ?) "
    "ON CONFLICT (device) DO UPDATE SET readings = readings + excluded.readings"
)


def count_new_readings(
    conn: sqlite3.Connection, new: int, per_device: Mapping[str, int] | None = None
) -> None:
    """Count the ``new`` readings the caller just inserted in ``device_counts`` and in the
    unbatched readings (the counters ``status`` reads; same transaction as the insert).

    ``per_device``: how many of them each device has, when the caller knows; else they are
    counted in the store: new readings take ids above every id ever used, so they are the
    ``new`` readings with the highest ids.
    """
    if per_device is None:
        per_device = dict(
            conn.execute(
                "SELECT device, COUNT(*) FROM "
                "(SELECT device FROM readings ORDER BY id DESC LIMIT ?) GROUP BY device",
                (new,),
            ).fetchall()
        )
    conn.executemany(_ADD_DEVICE_COUNT, per_device.items())
    conn.execute("UPDATE counts SET n = n + ? WHERE name = 'unbatched'", (new,))


def count_gone_readings(conn: sqlite3.Connection, per_device: Iterable[tuple[str, int]]) -> None:
    """Take readings the caller deletes, (device, how many) pairs, off ``device_counts``."""
    conn.executemany(
        "UPDATE device_counts SET readings = readings - ? WHERE device = ?",
        [(n, device) for device, n in per_device],
    )
    conn.execute("DELETE FROM device_counts WHERE readings <= 0")


def insert_readings(
    conn: sqlite3.Connection,
    readings: Iterable[Reading],
    *,
    source: str,
    received_at: int | None = None,
) -> int:
    """Insert readings, ignoring ones already stored (same device, ts, metric).

    Returns how many rows were new. Does not commit: call inside :func:`transaction`.
    """
    received_at = now_ms() if received_at is None else received_at
    return insert_rows(conn, [(d, ts, m, v, received_at, source) for d, ts, m, v in readings])


def insert_rows(conn: sqlite3.Connection, rows: Iterable[ReadingRow]) -> int:
    """:func:`insert_readings` of rows already complete: (device, ts, metric, value,
    received_at, source), many per statement (:func:`insert_reading_rows`). Returns how many
    were new; does not commit."""
    return insert_reading_rows(conn, [value for row in rows for value in row])


def insert_rejected(
    conn: sqlite3.Connection,
    *,
    source: str,
    topic: str | None,
    payload: bytes | str | None,
    reason: str,
    received_at: int | None = None,
) -> None:
    """Keep a message that could not be stored as readings, with the reason."""
    reason = storable(reason)
    conn.execute(
        "INSERT INTO rejected (received_at, source, topic, payload, reason) VALUES (?, ?, ?, ?, ?)",
        (
            now_ms() if received_at is None else received_at,
            source,
            None if topic is None else storable(topic),
            payload,
            reason,
        ),
    )
    conn.execute(_ADD_REASON, (reason, 1))
    conn.execute(_ADD_REJECTED, (1,))


_ADD_REASON = (
    "INSERT INTO rejected_reasons (reason, n) VALUES (?, ?) "
    "ON CONFLICT (reason) DO UPDATE SET n = n + excluded.n"
)
_ADD_REJECTED = "UPDATE counts SET n = n + ? WHERE name = 'rejected'"


def count_gone_rejected(conn: sqlite3.Connection, per_reason: Iterable[tuple[str, int]]) -> None:
    """Take rejected messages the caller deletes, (reason, how many) pairs, off the
    counters ``status`` reads (same transaction as the delete)."""
    per_reason = list(per_reason)
    conn.executemany(_ADD_REASON, [(reason, -n) for reason, n in per_reason])
    conn.execute(_ADD_REJECTED, (-sum(n for _, n in per_reason),))
    conn.execute("DELETE FROM rejected_reasons WHERE n <= 0")


def storable(text: str) -> str:
    """Text SQLite can take: a lone surrogate (a JSON ``"\\ud800"`` quoted in a reason)
    cannot be encoded as UTF-8, so it is kept as its escape instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


_SET_STATE = (
    "INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
)


def set_state(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Publish a daemon fact for ``status`` (e.g. ``collector.state``)."""
    conn.execute(_SET_STATE, (key, value, now_ms()))


def set_states(conn: sqlite3.Connection, facts: Iterable[tuple[str, str]]) -> None:
    """Publish several facts (key, value) at once, one statement for all."""
    now = now_ms()
    conn.executemany(_SET_STATE, ((key, value, now) for key, value in facts))


def get_state(conn: sqlite3.Connection) -> dict[str, tuple[str, int]]:
    """Every published fact as key -> (value, updated_at epoch ms)."""
    return {k: (v, at) for k, v, at in conn.execute("SELECT key, value, updated_at FROM state")}


def add_event(conn: sqlite3.Connection, kind: str, message: str) -> None:
    """Record an operational event (power, disk guard, export) for ``status``."""
    conn.execute(
        "INSERT INTO events (at, kind, message) VALUES (?, ?, ?)", (now_ms(), kind, message)
    )
