"""The hub's default storage backend: one SQLite file (WAL, synchronous=FULL) for all gateways.

It implements :class:`fieldgate.hub.storage.HubStorage`; connections, migrations and
transactions come from :mod:`fieldgate.store`, like the gateway's own store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fieldgate import store
from fieldgate.hub.storage import (
    GATEWAY_FIELDS,
    LAST_BATCH_FIELDS,
    UPLOAD_SWEEP_MS,
    IngestError,
    Row,
    StoredBatch,
    Upload,
    new_pin,
    new_secret,
    pin_matches,
    secret_hash,
)
from fieldgate.store import now_ms

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
}

#: The hub database's schema: its own version key, and a foreign database is refused.
HUB_SCHEMA = store.Schema(
    MIGRATIONS,
    version_key="hub_schema_version",
    what="fieldgate hub database",
    adopt_foreign=False,
)


def _literal(text: str) -> str:
    """An SQL string literal (SQLite has no backslash escapes: doubling quotes is complete)."""
    if "\x00" in text:
        raise IngestError("a serial or batch id must not contain NUL")
    return "'" + text.replace("'", "''") + "'"


class SqliteHubStorage:
    """:class:`~fieldgate.hub.storage.HubStorage` over one SQLite file."""

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout_ms: int = 60000):
        self.path = Path(path)
        self.conn = store.open_database(
            path,
            HUB_SCHEMA,
            label="hub database",
            create=create,
            busy_timeout_ms=busy_timeout_ms,
            check_same_thread=False,
        )
        # the primary key index grows with every gateway: keep its hot pages in memory
        self.conn.execute("PRAGMA cache_size = -65536")

    def close(self) -> None:
        self.conn.close()

    def _ensure_gateway(self, serial: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO gateways (serial, created_at) VALUES (?, ?)", (serial, now_ms())
        )

    # Registration -------------------------------------------------------------------------

    def create_pin(self, serial: str, valid_secs: int) -> str:
        pin, salt, hashed = new_pin()
        now = now_ms()
        with store.transaction(self.conn):
            self._ensure_gateway(serial)
            self.conn.execute(
                "INSERT INTO pins (serial, salt, pin_hash, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (serial, salt, hashed, now, now + valid_secs * 1000),
            )
        return pin

    def register(self, serial: str, pin: str) -> str | None:
        now = now_ms()
        with store.transaction(self.conn):
            candidates = self.conn.execute(
                "SELECT id, salt, pin_hash FROM pins WHERE serial = ? AND used_at IS NULL "
                "AND expires_at > ?",
                (serial, now),
            ).fetchall()
            match = next((i for i, salt, h in candidates if pin_matches(pin, salt, h)), None)
            if match is None:
                return None
            key = new_secret()
            self.conn.execute("UPDATE pins SET used_at = ? WHERE id = ?", (now, match))
            self.conn.execute(
                "UPDATE gateway_keys SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                (now, serial),
            )
            self.conn.execute(
                "INSERT INTO gateway_keys (key_hash, serial, created_at) VALUES (?, ?, ?)",
                (secret_hash(key), serial, now),
            )
            self.conn.execute(
                "UPDATE gateways SET registered_at = ?, last_seen = ? WHERE serial = ?",
                (now, now, serial),
            )
        return key

    def serial_for_key(self, key: str) -> str | None:
        row = self.conn.execute(
            "SELECT serial FROM gateway_keys WHERE key_hash = ? AND revoked_at IS NULL",
            (secret_hash(key),),
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
        token = new_secret()
        now = now_ms()
        expires = now + int(valid_secs * 1000)
        with store.transaction(self.conn):
            self.conn.execute("DELETE FROM uploads WHERE expires_at < ?", (now - UPLOAD_SWEEP_MS,))
            self.conn.execute(
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
        row = self.conn.execute(
            "SELECT serial, batch_id, manifest, expires_at FROM uploads WHERE token_hash = ?",
            (secret_hash(token),),
        ).fetchone()
        if not row:
            return None
        return Upload(row[0], row[1], json.loads(row[2]), row[3])

    def close_upload(self, token: str) -> None:
        with store.transaction(self.conn):
            self.conn.execute("DELETE FROM uploads WHERE token_hash = ?", (secret_hash(token),))

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
        flag = 1 if test else 0
        seen = 0

        def counted() -> Iterator[Row]:  # a closure counts a million rows fastest
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
        with store.transaction(self.conn):
            self._ensure_gateway(serial)
            before = self.conn.total_changes
            self.conn.executemany(insert, counted())
            new = self.conn.total_changes - before
            if expected_rows is not None and seen != expected_rows:
                raise IngestError(
                    f"the manifest announces {expected_rows} readings but readings.csv holds {seen}"
                )
            known = self._record_batch(
                serial, batch_id, rows=seen, new=new, flag=flag, manifest=manifest or {}
            )
            self.conn.execute(
                "UPDATE gateways SET rows = rows + ?, test_rows = test_rows + ?, "
                "batches = batches + ?, last_batch_id = ?, last_seen = ? WHERE serial = ?",
                (new, new * flag, 0 if known else 1, batch_id, now_ms(), serial),
            )
        return new

    def _record_batch(
        self,
        serial: str,
        batch_id: str,
        *,
        rows: int,
        new: int,
        flag: int,
        manifest: dict[str, Any],
    ) -> bool:
        """Add the batch's row (or its new readings to a known batch); True if it was known."""
        known = self.conn.execute(
            "UPDATE batches SET new_rows = new_rows + ? WHERE serial = ? AND batch_id = ?",
            (new, serial, batch_id),
        ).rowcount
        if known:
            return True
        self.conn.execute(
            "INSERT INTO batches (serial, batch_id, state, rows, new_rows, sha256, first_ts, "
            "last_ts, mode, type, test, manifest, stored_at) "
            "VALUES (?, ?, 'stored', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                serial,
                batch_id,
                rows,
                new,
                *(manifest.get(k) for k in ("sha256", "first_ts", "last_ts", "mode", "type")),
                flag,
                json.dumps(manifest),
                now_ms(),
            ),
        )
        return False

    def touch(self, serial: str) -> None:
        with store.transaction(self.conn):
            self.conn.execute(
                "UPDATE gateways SET last_seen = ? WHERE serial = ?", (now_ms(), serial)
            )

    # Summaries ----------------------------------------------------------------------------

    def _summary(self, row: tuple[Any, ...]) -> dict[str, Any]:
        d = dict(zip(GATEWAY_FIELDS, row, strict=True))
        last_id = d.pop("last_batch_id")
        b = self.conn.execute(
            f"SELECT {', '.join(LAST_BATCH_FIELDS)} FROM batches "  # noqa: S608 (constants)
            "WHERE serial = ? AND batch_id = ?",
            (d["serial"], last_id),
        ).fetchone()
        d["last_batch"] = dict(zip(LAST_BATCH_FIELDS, b, strict=True)) if b else None
        if d["last_batch"]:
            d["last_batch"]["test"] = bool(d["last_batch"]["test"])
        return d

    def gateways(self) -> list[dict[str, Any]]:
        return [
            self._summary(r)
            for r in self.conn.execute(
                f"SELECT {', '.join(GATEWAY_FIELDS)} FROM gateways ORDER BY serial"  # noqa: S608
            ).fetchall()
        ]

    def gateway(self, serial: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            f"SELECT {', '.join(GATEWAY_FIELDS)} FROM gateways WHERE serial = ?",  # noqa: S608
            (serial,),
        ).fetchone()
        return self._summary(row) if row else None

    def health(self) -> dict[str, Any]:
        n = self.conn.execute("SELECT COUNT(*) FROM gateways").fetchone()[0]
        return {"database": "ok", "gateways": n}
