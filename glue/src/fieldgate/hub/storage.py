"""Where the hub keeps gateways, credentials, batches and readings.

:class:`HubStorage` is the small interface the web app and ``hub import`` use; the SQLite
implementation (:class:`SqliteHubStorage`) is one database for all gateways. Another
backend (PostgreSQL) implements the same methods; the uniqueness of a reading over
``(serial, device, ts, metric)`` and "one batch ingest is one transaction" are part of the
interface, not of SQLite.

Secrets are stored hashed: gateway keys and upload tokens (high-entropy random strings)
as SHA-256, one-time PINs (short, typed by a person) salted with PBKDF2.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fieldgate.errors import FieldgateError
from fieldgate.store import now_ms

#: (device, ts epoch ms, metric, value)
Row = tuple[str, int, str, float]

HUB_SCHEMA_VERSION = 1

SCHEMA = """
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
"""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _pin_hash(pin: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", pin.encode("utf-8"), salt, 100_000)


def normalize_pin(pin: str) -> str:
    """PINs are typed by people: ignore spaces and dashes."""
    return "".join(ch for ch in pin if ch.isalnum())


def _literal(text: str) -> str:
    """An SQL string literal (SQLite has no backslash escapes: doubling quotes is complete)."""
    if "\x00" in text:
        raise IngestError("a serial or batch id must not contain NUL")
    return "'" + text.replace("'", "''") + "'"


class IngestError(Exception):
    """The readings of a batch are not acceptable (nothing of the batch was stored)."""


@dataclass(frozen=True)
class Upload:
    """An open upload URL: who may PUT which batch until when."""

    serial: str
    batch_id: str
    manifest: dict[str, Any]
    expires_at: int


@dataclass(frozen=True)
class StoredBatch:
    serial: str
    batch_id: str
    rows: int
    new_rows: int
    sha256: str | None


class HubStorage(Protocol):
    """What the hub needs from its database. Every method is safe to call from several
    processes at once (the web server runs several workers)."""

    def create_pin(self, serial: str, valid_secs: int) -> str:
        """A fresh one-time PIN for ``serial`` (stored hashed), valid for ``valid_secs``."""
        ...

    def register(self, serial: str, pin: str) -> str | None:
        """Redeem a PIN: a new gateway key (older keys of the serial revoked), or None."""
        ...

    def serial_for_key(self, key: str) -> str | None:
        """The gateway a key belongs to, or None for an unknown or revoked key."""
        ...

    def stored_batch(self, serial: str, batch_id: str) -> StoredBatch | None: ...

    def open_upload(
        self, serial: str, manifest: dict[str, Any], valid_secs: int
    ) -> tuple[str, int]:
        """A new upload token for a batch and its expiry (epoch ms); the token is stored hashed."""
        ...

    def find_upload(self, token: str) -> Upload | None:
        """The upload a token opened (expired ones included: the caller checks), or None."""
        ...

    def close_upload(self, token: str) -> None: ...

    def ingest(
        self,
        serial: str,
        batch_id: str,
        rows: Iterable[Row],
        *,
        test: bool = False,
        manifest: dict[str, Any] | None = None,
        expected_rows: int | None = None,
    ) -> int:
        """Store the readings of one batch exactly once; returns how many were new.

        All or nothing, in one transaction: a reading already held for
        ``(serial, device, ts, metric)`` is skipped, so ingesting the same rows any number of
        times (a retried upload, an exported database imported after its batches were
        uploaded) stores each once. ``rows`` may be a lazy iterator; if it raises, or yields
        a number of rows other than ``expected_rows`` (IngestError), nothing is stored. The
        batch is recorded under ``batch_id`` (re-ingesting a recorded batch_id only adds
        readings not yet held). ``test`` flags the rows as test data. ``hub import`` calls
        this with a batch_id naming the imported file.
        """
        ...

    def touch(self, serial: str) -> None:
        """Note that the gateway was seen now."""
        ...

    def gateways(self) -> list[dict[str, Any]]: ...

    def gateway(self, serial: str) -> dict[str, Any] | None: ...

    def health(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class SqliteHubStorage:
    """The hub's default storage: one SQLite file (WAL, synchronous=FULL) for all gateways."""

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout_ms: int = 60000):
        path = Path(path)
        if not path.exists():
            if not create:
                raise FieldgateError(f"hub database {path} does not exist")
            if not path.parent.is_dir():
                raise FieldgateError(f"hub database directory {path.parent} does not exist")
        self.path = path
        try:
            self.conn = sqlite3.connect(
                str(path),
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            # the primary key index grows with every gateway: keep its hot pages in memory
            self.conn.execute("PRAGMA cache_size = -65536")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise FieldgateError(f"hub database {path}: {exc}") from None

    def _migrate(self) -> None:
        row = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        if row:
            v = self.conn.execute(
                "SELECT value FROM meta WHERE key='hub_schema_version'"
            ).fetchone()
            if v and int(v[0]) > HUB_SCHEMA_VERSION:
                raise FieldgateError(
                    f"hub database {self.path} has schema version {v[0]}, newer than this "
                    f"fieldgate supports ({HUB_SCHEMA_VERSION})"
                )
            if v and int(v[0]) == HUB_SCHEMA_VERSION:
                return
        elif self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            raise FieldgateError(f"{self.path} is not a fieldgate hub database")
        # one script, one transaction: a hub database is created completely or not at all
        self.conn.executescript(
            f"BEGIN IMMEDIATE;\n{SCHEMA}\n"  # noqa: S608 (constants only)
            "INSERT OR REPLACE INTO meta (key, value) "
            f"VALUES ('hub_schema_version', '{HUB_SCHEMA_VERSION}');\nCOMMIT;"
        )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    def _ensure_gateway(self, serial: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO gateways (serial, created_at) VALUES (?, ?)", (serial, now_ms())
        )

    # Registration -------------------------------------------------------------------------

    def create_pin(self, serial: str, valid_secs: int) -> str:
        digits = f"{secrets.randbelow(10**10):010d}"
        pin = f"{digits[:5]}-{digits[5:]}"
        salt = secrets.token_bytes(16)
        now = now_ms()
        with self._tx():
            self._ensure_gateway(serial)
            self.conn.execute(
                "INSERT INTO pins (serial, salt, pin_hash, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (serial, salt, _pin_hash(normalize_pin(pin), salt), now, now + valid_secs * 1000),
            )
        return pin

    def register(self, serial: str, pin: str) -> str | None:
        pin = normalize_pin(pin)
        now = now_ms()
        with self._tx():
            candidates = self.conn.execute(
                "SELECT id, salt, pin_hash FROM pins WHERE serial = ? AND used_at IS NULL "
                "AND expires_at > ?",
                (serial, now),
            ).fetchall()
            match = next(
                (
                    pid
                    for pid, salt, h in candidates
                    if hmac.compare_digest(_pin_hash(pin, salt), h)
                ),
                None,
            )
            if match is None:
                return None
            key = secrets.token_urlsafe(32)
            self.conn.execute("UPDATE pins SET used_at = ? WHERE id = ?", (now, match))
            self.conn.execute(
                "UPDATE gateway_keys SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                (now, serial),
            )
            self.conn.execute(
                "INSERT INTO gateway_keys (key_hash, serial, created_at) VALUES (?, ?, ?)",
                (_sha(key), serial, now),
            )
            self.conn.execute(
                "UPDATE gateways SET registered_at = ?, last_seen = ? WHERE serial = ?",
                (now, now, serial),
            )
        return key

    def serial_for_key(self, key: str) -> str | None:
        row = self.conn.execute(
            "SELECT serial FROM gateway_keys WHERE key_hash = ? AND revoked_at IS NULL",
            (_sha(key),),
        ).fetchone()
        return row[0] if row else None

    # Uploads ------------------------------------------------------------------------------

    def stored_batch(self, serial: str, batch_id: str) -> StoredBatch | None:
        row = self.conn.execute(
            "SELECT serial, batch_id, rows, new_rows, sha256 FROM batches "
            "WHERE serial = ? AND batch_id = ?",
            (serial, batch_id),
        ).fetchone()
        return StoredBatch(*row) if row else None

    def open_upload(
        self, serial: str, manifest: dict[str, Any], valid_secs: int
    ) -> tuple[str, int]:
        token = secrets.token_urlsafe(32)
        now = now_ms()
        expires = now + int(valid_secs * 1000)
        with self._tx():
            self.conn.execute("DELETE FROM uploads WHERE expires_at < ?", (now - 86_400_000,))
            self.conn.execute(
                "INSERT INTO uploads (token_hash, serial, batch_id, manifest, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (_sha(token), serial, manifest["batch_id"], json.dumps(manifest), now, expires),
            )
        return token, expires

    def find_upload(self, token: str) -> Upload | None:
        row = self.conn.execute(
            "SELECT serial, batch_id, manifest, expires_at FROM uploads WHERE token_hash = ?",
            (_sha(token),),
        ).fetchone()
        if not row:
            return None
        return Upload(row[0], row[1], json.loads(row[2]), row[3])

    def close_upload(self, token: str) -> None:
        with self._tx():
            self.conn.execute("DELETE FROM uploads WHERE token_hash = ?", (_sha(token),))

    def ingest(
        self,
        serial: str,
        batch_id: str,
        rows: Iterable[Row],
        *,
        test: bool = False,
        manifest: dict[str, Any] | None = None,
        expected_rows: int | None = None,
    ) -> int:
        manifest = manifest or {}
        flag = 1 if test else 0
        now = now_ms()
        seen = 0

        def counted() -> Iterator[Row]:
            nonlocal seen
            for row in rows:
                seen += 1
                yield row

        # serial, batch_id and the flag are the same for every row: binding them as SQL
        # literals (quoted) instead of per-row parameters makes the insert a quarter cheaper
        insert = (
            "INSERT OR IGNORE INTO readings (serial, device, ts, metric, value, batch_id, test) "  # noqa: S608 (quoted by _literal)
            f"VALUES ({_literal(serial)}, ?, ?, ?, ?, {_literal(batch_id)}, {flag})"
        )
        with self._tx():
            self._ensure_gateway(serial)
            before = self.conn.total_changes
            self.conn.executemany(insert, counted())
            new = self.conn.total_changes - before
            if expected_rows is not None and seen != expected_rows:
                raise IngestError(
                    f"the manifest announces {expected_rows} readings but readings.csv holds {seen}"
                )
            existing = self.conn.execute(
                "SELECT new_rows FROM batches WHERE serial = ? AND batch_id = ?",
                (serial, batch_id),
            ).fetchone()
            if existing:
                self.conn.execute(
                    "UPDATE batches SET new_rows = new_rows + ? WHERE serial = ? AND batch_id = ?",
                    (new, serial, batch_id),
                )
            else:
                self.conn.execute(
                    "INSERT INTO batches (serial, batch_id, state, rows, new_rows, sha256, "
                    "first_ts, last_ts, mode, type, test, manifest, stored_at) "
                    "VALUES (?, ?, 'stored', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        serial,
                        batch_id,
                        seen,
                        new,
                        manifest.get("sha256"),
                        manifest.get("first_ts"),
                        manifest.get("last_ts"),
                        manifest.get("mode"),
                        manifest.get("type"),
                        flag,
                        json.dumps(manifest),
                        now,
                    ),
                )
            self.conn.execute(
                "UPDATE gateways SET rows = rows + ?, test_rows = test_rows + ?, "
                "batches = batches + ?, last_batch_id = ?, last_seen = ? WHERE serial = ?",
                (new, new * flag, 0 if existing else 1, batch_id, now, serial),
            )
        return new

    def touch(self, serial: str) -> None:
        with self._tx():
            self.conn.execute(
                "UPDATE gateways SET last_seen = ? WHERE serial = ?", (now_ms(), serial)
            )

    # Summaries ----------------------------------------------------------------------------

    _GATEWAY_COLUMNS = (
        "serial, created_at, registered_at, last_seen, last_batch_id, rows, test_rows, batches"
    )

    def _gateway_dict(self, row: tuple[Any, ...]) -> dict[str, Any]:
        keys = [k.strip() for k in self._GATEWAY_COLUMNS.split(",")]
        d = dict(zip(keys, row, strict=True))
        last = None
        if d["last_batch_id"]:
            b = self.conn.execute(
                "SELECT batch_id, rows, new_rows, first_ts, last_ts, mode, test, stored_at "
                "FROM batches WHERE serial = ? AND batch_id = ?",
                (d["serial"], d["last_batch_id"]),
            ).fetchone()
            if b:
                last = dict(
                    zip(
                        (
                            "batch_id",
                            "rows",
                            "new_rows",
                            "first_ts",
                            "last_ts",
                            "mode",
                            "test",
                            "stored_at",
                        ),
                        b,
                        strict=True,
                    )
                )
                last["test"] = bool(last["test"])
        d["last_batch"] = last
        del d["last_batch_id"]
        return d

    def gateways(self) -> list[dict[str, Any]]:
        return [
            self._gateway_dict(r)
            for r in self.conn.execute(
                f"SELECT {self._GATEWAY_COLUMNS} FROM gateways ORDER BY serial"  # noqa: S608
            ).fetchall()
        ]

    def gateway(self, serial: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            f"SELECT {self._GATEWAY_COLUMNS} FROM gateways WHERE serial = ?",  # noqa: S608
            (serial,),
        ).fetchone()
        return self._gateway_dict(row) if row else None

    def health(self) -> dict[str, Any]:
        self.conn.execute("SELECT 1").fetchone()
        n = self.conn.execute("SELECT COUNT(*) FROM gateways").fetchone()[0]
        return {"database": "ok", "gateways": n}
