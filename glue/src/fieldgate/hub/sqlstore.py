"""The hub storage's SQL, shared by the SQLite and the PostgreSQL backend.

Both databases hold the same tables (``sqlite_storage.MIGRATIONS``, ``pg_storage.MIGRATIONS``):

- ``series``: one row per (serial, device, metric) with its id, first and last ts and how
  many readings it holds (kept exact by ingest and retention: the extent query reads it);
- ``samples``: the readings, ``(series, ts, value, batch)`` keyed by ``(series, ts)``, so
  a reading is unique over (serial, device, ts, metric) and a time range of one device and
  metric is one index range; ``batch`` is the ``batches.seq`` that stored it;
- on SQLite only, ``blocks``: one row per series and batch with that batch's readings of
  the series as JSON text (:mod:`fieldgate.hub.sqlite_storage`); a reading is in
  ``samples`` or in a block, never both. What reads raw readings goes through the
  backend (:meth:`SqlHubStorage.readings`, :meth:`~SqlHubStorage._points`,
  :meth:`~SqlHubStorage._raw_sums`, :attr:`~SqlHubStorage.latest_value`, the retention
  hooks), never names ``samples`` itself;
- ``rollups``: per series and ten UTC minutes, the min, max, sum and count of its
  readings (``(series, bucket)`` keyed), kept exact by ingest and retention, so that
  statistics over long windows in whole ten-minute buckets read one row per ten minutes
  instead of the readings (:meth:`SqlHubStorage.buckets`);
- ``readings``: a view with the contract's columns ``(serial, device, ts, metric, value,
  batch_id, test)`` over them (docs/contract.md §6), for people and tools;
- ``gateways`` (with ``domain``, ``last_heartbeat``, ``last_status`` and its
  ``last_brief``, what the fleet page shows of it), ``batches``,
  ``pins``, ``gateway_keys``, ``uploads``, ``users``, ``user_domains``, ``login_failures``
  and ``meta``.

SQL is written once with ``?`` placeholders (PostgreSQL's backend rewrites them); what
differs (locking rows, the bulk insert of readings, streaming) is a method of the backend.

Lock order, so that concurrent writers never deadlock on PostgreSQL: a batch's
``batches`` row, then ``series`` rows in id order, then their ``rollups`` rows, then the
``gateways`` row.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import pyarrow as pa

from fieldgate.batchfile import columns_of
from fieldgate.hub.overview import brief
from fieldgate.hub.storage import (
    BUCKET_FIELDS,
    DEFAULT_DOMAIN,
    EXTENT_FIELDS,
    GATEWAY_FIELDS,
    LAST_BATCH_FIELDS,
    UPLOAD_SWEEP_MS,
    Domains,
    IngestError,
    Series,
    StoredBatch,
    Upload,
    User,
    new_pin,
    new_secret,
    pin_matches,
    secret_hash,
)
from fieldgate.hub.table import Readings, table_columns
from fieldgate.names import ALLOWED, METRIC_RE, NAME_RE
from fieldgate.store import now_ms

#: The view with the contract's readings columns, the same on both backends.
READINGS_VIEW = """
CREATE VIEW readings AS
    SELECT s.serial, s.device, r.ts, s.metric, r.value, b.batch_id, b.test
    FROM samples r
    JOIN series s ON s.id = r.series
    JOIN batches b ON b.seq = r.batch
"""


def _summary_sql(status_column: str) -> str:
    return (
        "SELECT "
        + ", ".join(f"g.{f}" if f != "status" else f"g.{status_column}" for f in GATEWAY_FIELDS)
        + ", "
        + ", ".join(f"b.{f}" for f in LAST_BATCH_FIELDS)
        + " FROM gateways g LEFT JOIN batches b"
        " ON b.serial = g.serial AND b.batch_id = g.last_batch_id"
    )


_SUMMARY_SQL = _summary_sql("last_status")
#: The same with the heartbeat's brief in place of the whole status (the fleet page).
_BRIEF_SQL = _summary_sql("last_brief")


#: The width of a rollup bucket (ms): ten minutes (measured in bench/hub/pages.py: one
#: minute cost PostgreSQL's ingest of one-a-minute readings 1.9x, ten minutes 1.0-1.3x).
#: The migrations that create the rollups write it out (a migration never changes).
ROLLUP_MS = 600_000
#: The rollups of every bucket of a series from ``lo`` to before ``hi``, rebuilt from its
#: readings (after the buckets' rows are deleted): ``{points}`` is the backend's
#: :meth:`SqlHubStorage._points` (series, lo, hi), ``?`` first the series id.
ROLLUP_REBUILD = (
    "INSERT INTO rollups (series, bucket, min, max, sum, count) "
    "SELECT ?, (ts / 600000) * 600000 AS slot, MIN(value), MAX(value), SUM(value), "
    "COUNT(*) FROM ({points}) p GROUP BY slot ORDER BY slot"
)
#: A series' samples (ts, value) in [start, end): ``?`` series, start, end.
SAMPLE_POINTS = "SELECT ts, value FROM samples WHERE series = ? AND ts >= ? AND ts < ?"
#: A series' raw readings in [start, end) per bucket of ``every`` counted from ``origin``:
#: ``?`` origin, origin, every, every, then the :meth:`SqlHubStorage._points` parameters.
RAW_SUMS = (
    "SELECT ? + ((ts - ?) / ?) * ? AS b, MIN(value), MAX(value), SUM(value), COUNT(*) "
    "FROM ({points}) p GROUP BY b ORDER BY b"
)


def check_device(name: str) -> None:
    """A reading's device is a name (:mod:`fieldgate.names`: at most 64 characters, no
    NUL, line break or space), as the gateway checked it: IngestError otherwise."""
    if NAME_RE.fullmatch(name) is None:
        raise IngestError(
            f"device name {name!r:.80} is not acceptable ({ALLOWED['name']}, at most 64)"
        )


def check_metric(name: str) -> None:
    """A reading's metric is a metric name (:mod:`fieldgate.names`): IngestError otherwise."""
    if METRIC_RE.fullmatch(name) is None:
        raise IngestError(
            f"metric name {name!r:.80} is not acceptable ({ALLOWED['metric']}, at most 64)"
        )


def check_names(device: str, metric: str) -> None:
    """Both names of a reading (checked once per series, not per reading)."""
    check_device(device)
    check_metric(metric)


def _check_count(seen: int, expected: int | None) -> None:
    if expected is not None and seen != expected:
        raise IngestError(
            f"the manifest announces {expected} readings but readings.csv holds {seen}"
        )


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


class SqlHubStorage(ABC):
    """:class:`~fieldgate.hub.storage.HubStorage` over a DB-API connection; a backend
    subclasses it (see the module docstring)."""

    #: Appended to a SELECT that must lock the rows it reads (PostgreSQL: `` FOR UPDATE``).
    for_update = ""
    #: Run first in :meth:`claim_attempt`'s transaction so that claims run one at a time
    #: (SQLite: none needed, BEGIN IMMEDIATE takes the write lock already).
    lock_login_failures = ""
    #: The column that names one row of a table without a key (SQLite: ``rowid``).
    row_id = "rowid"
    #: The two-argument minimum and maximum of the dialect.
    least = "min"
    greatest = "max"

    conn: Any

    def __init__(self) -> None:
        #: serial -> (device, metric) -> series id, for series committed to the database
        #: (series rows are never deleted, so their ids stay valid).
        self._series_ids: dict[str, dict[tuple[str, str], int]] = {}

    # What a backend provides --------------------------------------------------------------

    @abstractmethod
    def _x(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Execute one statement; the cursor."""

    @abstractmethod
    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Execute one statement for each of ``rows``."""

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Any]:
        """A write transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: READ COMMITTED)."""

    def _ingest_tx(self) -> AbstractContextManager[Any]:
        """The transaction of one batch's ingest (by default :meth:`_tx`)."""
        return self._tx()

    def _stage(self, serial: str, rows: Readings) -> tuple[Any, int | None]:
        """What may be done with a batch's readings before its transaction begins: what
        :meth:`_insert_rows` is then given, and how many readings were read (None: not
        yet). By default nothing: the readings are read inside the transaction, as
        :class:`Columns`."""
        if isinstance(rows, pa.Table):
            return table_columns(rows), None
        return columns_of(rows), None

    @abstractmethod
    def _insert_rows(
        self, serial: str, seq: int, staged: Any, ids: dict[tuple[str, str], int]
    ) -> tuple[int, dict[int, tuple[int, int, int]]]:
        """Insert a batch's readings (``staged``: what :meth:`_stage` returned) under
        ``batches.seq`` ``seq``: how many rows were read, and per series id with new rows
        (how many, and a first and last ts that the series' range must include: those of
        the new readings whenever the base :meth:`_add_rollups` is to rebuild from them).
        ``ids`` collects the series ids used, (device, metric) -> id."""

    @abstractmethod
    def readings(self, series_id: int, start: int, end: int) -> Iterator[tuple[int, float]]:
        """A series' (ts, value) pairs with start <= ts < end, in time order."""

    def _points(self, series_id: int, start: int, end: int) -> tuple[str, tuple[Any, ...]]:
        """A SELECT of a series' readings ``(ts, value)`` with start <= ts < end (any
        order) and its parameters: what SQL over raw readings reads (the rollups'
        rebuild). By default the samples; the SQLite backend adds its blocks."""
        return SAMPLE_POINTS, (series_id, start, end)

    #: The value of a series' last reading, an SQL expression over ``series s``.
    latest_value = "(SELECT value FROM samples WHERE series = s.id AND ts = s.last_ts)"

    def _add_rollups(self, per_series: dict[int, tuple[int, int, int]]) -> None:
        """Bring the rollups up to date with a batch's new readings (per series: new rows,
        first and last ts of the new ones): here, each bucket from the first to the last
        rebuilt from the samples (correct whatever the batch repeated); a backend may do it
        cheaper."""
        self._rebuild_rollups({sid: (lo, hi + 1) for sid, (_, lo, hi) in per_series.items()})

    def _rebuild_rollups(self, spans: dict[int, tuple[int, int]]) -> None:
        """Rebuild the rollups of the buckets that [lo, hi) touches, per series."""
        for sid, (lo, hi) in sorted(spans.items()):
            first, end = lo // ROLLUP_MS * ROLLUP_MS, -(-hi // ROLLUP_MS) * ROLLUP_MS
            self._x(
                "DELETE FROM rollups WHERE series = ? AND bucket >= ? AND bucket < ?",
                (sid, first, end),
            )
            points, params = self._points(sid, first, end)
            self._x(ROLLUP_REBUILD.format(points=points), (sid, *params))

    def close(self) -> None:
        self.conn.close()

    # Shared helpers -----------------------------------------------------------------------

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._x(sql, params).fetchone()

    def _ensure_gateway(self, serial: str) -> None:
        self._x(
            "INSERT INTO gateways (serial, created_at, domain) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (serial, now_ms(), DEFAULT_DOMAIN),
        )

    def _series_id(self, serial: str, device: str, metric: str) -> int:
        """The id of a series, created if new (inside the caller's transaction)."""
        known = self._series_ids.get(serial, {}).get((device, metric))
        if known is not None:
            return known
        check_names(device, metric)
        self._x(
            "INSERT INTO series (serial, device, metric, count) VALUES (?, ?, ?, 0) "
            "ON CONFLICT DO NOTHING",
            (serial, device, metric),
        )
        return int(
            self._one(
                "SELECT id FROM series WHERE serial = ? AND device = ? AND metric = ?",
                (serial, device, metric),
            )[0]
        )

    # Registration -------------------------------------------------------------------------

    def create_pin(self, serial: str, valid_secs: int) -> str:
        pin, salt, hashed = new_pin()
        now = now_ms()
        with self._tx():
            self._ensure_gateway(serial)
            self._x(
                "INSERT INTO pins (serial, salt, pin_hash, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (serial, salt, hashed, now, now + valid_secs * 1000),
            )
        return pin

    def register(self, serial: str, pin: str) -> str | None:
        now = now_ms()
        # PBKDF2 is slow on purpose: match the PIN before any write lock is taken
        candidates = self._x(
            "SELECT id, salt, pin_hash FROM pins WHERE serial = ? AND used_at IS NULL "
            "AND expires_at > ?",
            (serial, now),
        ).fetchall()
        match = next((i for i, salt, h in candidates if pin_matches(pin, salt, h)), None)
        if match is None:
            return None
        key = new_secret()
        with self._tx():
            # the PIN is used once: of concurrent redemptions one updates the row
            won = self._x(
                "UPDATE pins SET used_at = ? WHERE id = ? AND used_at IS NULL AND expires_at > ?",
                (now, match, now),
            ).rowcount
            if won != 1:
                return None
            # one valid key per gateway: registrations of one gateway take turns here
            self._x(f"SELECT serial FROM gateways WHERE serial = ?{self.for_update}", (serial,))
            self._x(
                "UPDATE gateway_keys SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                (now, serial),
            )
            self._x(
                "INSERT INTO gateway_keys (key_hash, serial, created_at) VALUES (?, ?, ?)",
                (secret_hash(key), serial, now),
            )
            self._x(
                "UPDATE gateways SET registered_at = ?, last_seen = ? WHERE serial = ?",
                (now, now, serial),
            )
        return key

    def serial_for_key(self, key: str) -> str | None:
        row = self._one(
            "SELECT serial FROM gateway_keys WHERE key_hash = ? AND revoked_at IS NULL",
            (secret_hash(key),),
        )
        return row[0] if row else None

    # Uploads ------------------------------------------------------------------------------

    def stored_batch(self, serial: str, batch_id: str) -> StoredBatch | None:
        row = self._one(
            "SELECT serial, batch_id, rows, new_rows, sha256 FROM batches "
            "WHERE serial = ? AND batch_id = ?",
            (serial, batch_id),
        )
        return StoredBatch(*row) if row else None

    def open_upload(
        self, serial: str, manifest: dict[str, Any], valid_secs: float
    ) -> tuple[str, int]:
        token = new_secret()
        now = now_ms()
        expires = now + int(valid_secs * 1000)
        with self._tx():
            self._x("DELETE FROM uploads WHERE expires_at < ?", (now - UPLOAD_SWEEP_MS,))
            self._x(
                "INSERT INTO uploads (token_hash, serial, batch_id, manifest, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    secret_hash(token),
                    serial,
                    manifest["batch_id"],
                    json.dumps(manifest),
                    now,
                    expires,
                ),
            )
        return token, expires

    def find_upload(self, token: str) -> Upload | None:
        row = self._one(
            "SELECT serial, batch_id, manifest, expires_at FROM uploads WHERE token_hash = ?",
            (secret_hash(token),),
        )
        if not row:
            return None
        return Upload(row[0], row[1], json.loads(row[2]), row[3])

    def close_upload(self, token: str) -> None:
        with self._tx():
            self._x("DELETE FROM uploads WHERE token_hash = ?", (secret_hash(token),))

    def ingest(
        self,
        serial: str,
        batch_id: str,
        rows: Readings,
        *,
        test: bool = False,
        manifest: dict[str, Any] | None = None,
        expected_rows: int | None = None,
    ) -> int | None:
        flag = 1 if test else 0
        m = manifest or {}
        ids: dict[tuple[str, str], int] = {}
        if self.stored_batch(serial, batch_id) is not None:  # the readings are not read
            return None
        staged, counted = self._stage(serial, rows)
        if counted is not None:  # refused before any lock is taken
            _check_count(counted, expected_rows)
        with self._ingest_tx():
            self._ensure_gateway(serial)
            # the batch's row first: its unique key decides which of concurrent ingests of
            # one batch stores it (PostgreSQL makes the others wait, then skip)
            claimed = self._one(
                "INSERT INTO batches (serial, batch_id, state, rows, new_rows, sha256, "
                "first_ts, last_ts, mode, type, test, manifest, stored_at) "
                "VALUES (?, ?, 'stored', 0, 0, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (serial, batch_id) DO NOTHING RETURNING seq",
                (
                    serial,
                    batch_id,
                    *(m.get(k) for k in ("sha256", "first_ts", "last_ts", "mode", "type")),
                    flag,
                    json.dumps(m),
                    now_ms(),
                ),
            )
            if claimed is None:
                return None
            seq = int(claimed[0])
            seen, per_series = self._insert_rows(serial, seq, staged, ids)
            _check_count(seen, expected_rows)
            new = sum(n for n, _, _ in per_series.values())
            self._many(
                f"UPDATE series SET count = count + ?, "
                f"first_ts = {self.least}(COALESCE(first_ts, ?), ?), "
                f"last_ts = {self.greatest}(COALESCE(last_ts, ?), ?) WHERE id = ?",
                [(n, lo, lo, hi, hi, sid) for sid, (n, lo, hi) in sorted(per_series.items())],
            )
            self._add_rollups(per_series)
            self._x("UPDATE batches SET rows = ?, new_rows = ? WHERE seq = ?", (seen, new, seq))
            self._x(
                "UPDATE gateways SET rows = rows + ?, test_rows = test_rows + ?, "
                "batches = batches + 1, last_batch_id = ?, last_seen = ? WHERE serial = ?",
                (new, new * flag, batch_id, now_ms(), serial),
            )
        self._series_ids.setdefault(serial, {}).update(ids)  # committed: safe to remember
        return new

    def touch(self, serial: str) -> None:
        with self._tx():
            self._x("UPDATE gateways SET last_seen = ? WHERE serial = ?", (now_ms(), serial))

    def record_heartbeat(self, serial: str, status: dict[str, Any]) -> None:
        now = now_ms()
        short = json.dumps(brief(status))
        with self._tx():
            self._x(
                "UPDATE gateways SET last_heartbeat = ?, last_seen = ?, last_status = ?, "
                "last_brief = ? WHERE serial = ?",
                (now, now, json.dumps(status), short, serial),
            )

    # Gateways and domains -----------------------------------------------------------------

    def _summary(self, row: Sequence[Any], brief: bool = False) -> dict[str, Any]:
        d = dict(zip(GATEWAY_FIELDS, row[: len(GATEWAY_FIELDS)], strict=True))
        d.pop("last_batch_id")
        d["brief" if brief else "status"] = json.loads(d.pop("status") or "null")
        b = dict(zip(LAST_BATCH_FIELDS, row[len(GATEWAY_FIELDS) :], strict=True))
        d["last_batch"] = {**b, "test": bool(b["test"])} if b["batch_id"] is not None else None
        return d

    def gateways(self, domains: Domains = None, *, brief: bool = False) -> list[dict[str, Any]]:
        sql = _BRIEF_SQL if brief else _SUMMARY_SQL
        if domains is None:
            rows = self._x(f"{sql} ORDER BY g.serial").fetchall()
        elif not domains:
            return []
        else:
            ds = sorted(domains)
            rows = self._x(
                f"{sql} WHERE g.domain IN ({_placeholders(len(ds))}) ORDER BY g.serial", ds
            ).fetchall()
        return [self._summary(r, brief) for r in rows]

    def gateway(self, serial: str, domains: Domains = None) -> dict[str, Any] | None:
        row = self._one(f"{_SUMMARY_SQL} WHERE g.serial = ?", (serial,))
        if row is None:
            return None
        d = self._summary(row)
        if domains is not None and d["domain"] not in domains:
            return None
        return d

    def set_domain(self, serial: str, domain: str) -> str | None:
        with self._tx():
            row = self._one(
                f"SELECT domain FROM gateways WHERE serial = ?{self.for_update}", (serial,)
            )
            if row is None:
                self._x(
                    "INSERT INTO gateways (serial, created_at, domain) VALUES (?, ?, ?)",
                    (serial, now_ms(), domain),
                )
                return None
            self._x("UPDATE gateways SET domain = ? WHERE serial = ?", (domain, serial))
            return str(row[0])

    # Users --------------------------------------------------------------------------------

    def _users(self, where: str = "", params: Sequence[Any] = ()) -> list[User]:
        rows = self._x(
            "SELECT u.name, u.password_hash, u.admin, u.created_at, u.updated_at, d.domain "
            f"FROM users u LEFT JOIN user_domains d ON d.name = u.name {where} "
            "ORDER BY u.name, d.domain",
            params,
        ).fetchall()
        out: dict[str, User] = {}
        for name, pw, admin, created, updated, domain in rows:
            u = out.get(name) or User(name, pw, bool(admin), (), created, updated)
            out[name] = (
                User(u.name, u.password_hash, u.admin, (*u.domains, domain), created, updated)
                if domain is not None
                else u
            )
        return list(out.values())

    def user(self, name: str) -> User | None:
        found = self._users("WHERE u.name = ?", (name,))
        return found[0] if found else None

    def users(self) -> list[User]:
        return self._users()

    def _set_domains(self, name: str, domains: Iterable[str]) -> None:
        self._x("DELETE FROM user_domains WHERE name = ?", (name,))
        self._many(
            "INSERT INTO user_domains (name, domain) VALUES (?, ?)",
            [(name, d) for d in sorted(set(domains))],
        )

    def add_user(
        self, name: str, password_hash: str, domains: Iterable[str], *, admin: bool
    ) -> bool:
        now = now_ms()
        with self._tx():
            added = self._x(
                "INSERT INTO users (name, password_hash, admin, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (name, password_hash, int(admin), now, now),
            ).rowcount
            if added != 1:
                return False
            self._set_domains(name, domains)
        return True

    def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        domains: Iterable[str] | None = None,
        admin: bool | None = None,
    ) -> bool:
        with self._tx():
            found = self._x(
                "UPDATE users SET updated_at = ?, password_hash = COALESCE(?, password_hash), "
                "admin = COALESCE(?, admin) WHERE name = ?",
                (now_ms(), password_hash, None if admin is None else int(admin), name),
            ).rowcount
            if found != 1:
                return False
            if domains is not None:
                self._set_domains(name, domains)
        return True

    def remove_user(self, name: str) -> bool:
        with self._tx():
            self._x("DELETE FROM user_domains WHERE name = ?", (name,))
            return bool(self._x("DELETE FROM users WHERE name = ?", (name,)).rowcount)

    # Login failures -----------------------------------------------------------------------

    def login_failures(self, keys: Iterable[str], since: int) -> dict[str, tuple[int, int]]:
        ks = sorted(set(keys))
        rows = self._x(
            "SELECT key, COUNT(*), MIN(at) FROM login_failures "
            f"WHERE key IN ({_placeholders(len(ks))}) AND at >= ? GROUP BY key",
            (*ks, since),
        ).fetchall()
        return {k: (int(n), int(oldest)) for k, n, oldest in rows}

    def claim_attempt(
        self, limits: Mapping[str, int], at: int, *, since: int
    ) -> dict[str, tuple[int, int]]:
        with self._tx():
            if self.lock_login_failures:
                self._x(self.lock_login_failures)
            self._x("DELETE FROM login_failures WHERE at < ?", (since,))
            counts = self.login_failures(limits, since)
            if all(counts.get(k, (0, 0))[0] < limit for k, limit in limits.items()):
                self._many(
                    "INSERT INTO login_failures (key, at) VALUES (?, ?)", [(k, at) for k in limits]
                )
        return counts

    def forget_attempt(self, keys: Iterable[str], at: int) -> None:
        with self._tx():
            # under the claim's lock too: two attempts of one key in one millisecond have
            # equal rows, and two unlocked deletes on PostgreSQL would pick the same one
            if self.lock_login_failures:
                self._x(self.lock_login_failures)
            for key in keys:
                self._x(
                    f"DELETE FROM login_failures WHERE {self.row_id} IN (SELECT {self.row_id} "
                    "FROM login_failures WHERE key = ? AND at = ? LIMIT 1)",
                    (key, at),
                )

    def clear_login_failures(self, key: str) -> None:
        with self._tx():
            self._x("DELETE FROM login_failures WHERE key = ?", (key,))

    def secret(self, name: str) -> str:
        key = f"secret.{name}"
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        if row is None:
            with self._tx():
                self._x(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (key, new_secret()),
                )
            row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return str(row[0])

    # Reading ------------------------------------------------------------------------------

    def series(self, serial: str, device: str, metric: str) -> Series | None:
        row = self._one(
            "SELECT id, first_ts, last_ts, count FROM series "
            "WHERE serial = ? AND device = ? AND metric = ?",
            (serial, device, metric),
        )
        return Series(*row) if row else None

    def extent(self, serial: str, device: str | None = None) -> list[dict[str, Any]]:
        where, params = (
            ("AND device = ?", (serial, device)) if device is not None else ("", (serial,))
        )
        rows = self._x(
            f"SELECT {', '.join(EXTENT_FIELDS)} FROM series "
            f"WHERE serial = ? {where} AND count > 0 ORDER BY device, metric",
            params,
        ).fetchall()
        return [dict(zip(EXTENT_FIELDS, r, strict=True)) for r in rows]

    def latest(self, serial: str) -> list[tuple[str, str, int, float, int]]:
        rows = self._x(
            f"SELECT s.device, s.metric, s.last_ts, {self.latest_value}, s.count FROM series s "
            "WHERE s.serial = ? AND s.count > 0 ORDER BY s.device, s.metric",
            (serial,),
        ).fetchall()
        return [(str(d), str(m), int(ts), float(v), int(n)) for d, m, ts, v, n in rows]

    def buckets(
        self, series_id: int, start: int, end: int, every: int, origin: int
    ) -> list[tuple[int, float, float, float, int]]:
        """Buckets of whole rollup buckets (every a multiple of :data:`ROLLUP_MS`, counted
        from a multiple of it) are made of the rollups, and of the readings of the partial
        rollup buckets at either end of the range; any other buckets of the readings."""
        assert len(BUCKET_FIELDS) == 5
        if every % ROLLUP_MS or origin % ROLLUP_MS:
            parts = [self._sums("samples", series_id, (start, end), every, origin)]
        else:
            first = min(end, -(-start // ROLLUP_MS) * ROLLUP_MS)  # the first whole one
            last = max(first, end // ROLLUP_MS * ROLLUP_MS)  # the end of the last whole one
            parts = [
                self._sums("samples", series_id, (start, first), every, origin),
                self._sums("rollups", series_id, (first, last), every, origin),
                self._sums("samples", series_id, (last, end), every, origin),
            ]
        merged: dict[int, list[float]] = {}
        for part in parts:
            for b, lo, hi, total, n in part:
                got = merged.get(b)
                if got is None:
                    merged[b] = [lo, hi, total, n]
                else:
                    got[0], got[1] = min(got[0], lo), max(got[1], hi)
                    got[2] += total
                    got[3] += n
        return [(b, lo, hi, total / n, int(n)) for b, (lo, hi, total, n) in sorted(merged.items())]

    def _sums(
        self, table: str, series_id: int, span: tuple[int, int], every: int, origin: int
    ) -> list[tuple[int, float, float, float, int]]:
        """(bucket, min, max, sum, count) from the readings (``samples``: the backend's
        :meth:`_points`) or the rollups in [start, end)."""
        start, end = span
        if start >= end:
            return []
        if table == "samples":
            return self._raw_sums(series_id, span, every, origin)
        sql = (
            "SELECT ? + ((bucket - ?) / ?) * ? AS b, MIN(min), MAX(max), SUM(sum), "
            "SUM(count) FROM rollups WHERE series = ? AND bucket >= ? AND bucket < ? "
            "GROUP BY b ORDER BY b"
        )
        params = (series_id, start, end)
        return [
            (int(b), float(lo), float(hi), float(total), int(n))
            for b, lo, hi, total, n in self._x(
                sql, (origin, origin, every, every, *params)
            ).fetchall()
        ]

    def _raw_sums(
        self, series_id: int, span: tuple[int, int], every: int, origin: int
    ) -> list[tuple[int, float, float, float, int]]:
        """(bucket, min, max, sum, count) of a series' readings in [start, end) (a bucket
        may come more than once: :meth:`buckets` merges them); here by SQL over
        :meth:`_points`."""
        return self._sql_sums(self._points(series_id, *span), every, origin)

    def _sql_sums(
        self, points: tuple[str, tuple[Any, ...]], every: int, origin: int
    ) -> list[tuple[int, float, float, float, int]]:
        sql, params = points
        return [
            (int(b), float(lo), float(hi), float(total), int(n))
            for b, lo, hi, total, n in self._x(
                RAW_SUMS.format(points=sql), (origin, origin, every, every, *params)
            ).fetchall()
        ]

    # Retention ----------------------------------------------------------------------------

    def delete_before(self, cutoff: int, max_rows: int) -> int:
        with self._tx():
            row = self._one(
                "SELECT id, serial FROM series WHERE first_ts < ? ORDER BY first_ts LIMIT 1"
                f"{self.for_update}",
                (cutoff,),
            )
            if row is None:
                return 0
            sid, serial = row
            upto = self._retention_end(sid, cutoff, max_rows)
            deleted, test = self._delete_before(sid, upto)
            whole = upto // ROLLUP_MS * ROLLUP_MS  # buckets before it are gone entirely
            self._x("DELETE FROM rollups WHERE series = ? AND bucket < ?", (sid, whole))
            if whole < upto:
                self._rebuild_rollups({sid: (whole, upto)})
            first = self._first_ts(sid)
            if first is None:  # emptied: the row stays (its id may be cached by any worker)
                self._x(
                    "UPDATE series SET count = count - ?, first_ts = NULL, last_ts = NULL "
                    "WHERE id = ?",
                    (deleted, sid),
                )
            else:
                self._x(
                    "UPDATE series SET count = count - ?, first_ts = ? WHERE id = ?",
                    (deleted, first, sid),
                )
            self._x(
                "UPDATE gateways SET rows = rows - ?, test_rows = test_rows - ? WHERE serial = ?",
                (deleted, test, serial),
            )
        return int(deleted)

    def _retention_end(self, series_id: int, cutoff: int, max_rows: int) -> int:
        """Where one step of retention ends: the ts before which at most ``max_rows``
        readings of the series are, at most ``cutoff``."""
        nth = self._one(
            "SELECT ts FROM samples WHERE series = ? AND ts < ? ORDER BY ts LIMIT 1 OFFSET ?",
            (series_id, cutoff, max_rows),
        )
        return int(nth[0]) if nth else cutoff

    def _delete_before(self, series_id: int, upto: int) -> tuple[int, int]:
        """Delete a series' readings before ``upto``: how many, and how many of them were
        sent in TEST mode."""
        test = self._one(
            "SELECT COUNT(*) FROM samples r JOIN batches b ON b.seq = r.batch "
            "WHERE r.series = ? AND r.ts < ? AND b.test = 1",
            (series_id, upto),
        )[0]
        deleted = self._x(
            "DELETE FROM samples WHERE series = ? AND ts < ?", (series_id, upto)
        ).rowcount
        return int(deleted), int(test)

    def _first_ts(self, series_id: int) -> int | None:
        """The ts of a series' first reading held (None: it holds none)."""
        first = self._one("SELECT MIN(ts) FROM samples WHERE series = ?", (series_id,))[0]
        return None if first is None else int(first)

    # The database -------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        n = self._one("SELECT COUNT(*) FROM gateways")[0]
        return {"database": "ok", "gateways": int(n)}
