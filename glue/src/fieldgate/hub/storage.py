"""What the hub needs from its database: the backend-neutral storage interface.

:class:`HubStorage` is the small interface the web app and ``hub import`` use. The SQLite
backend (:mod:`fieldgate.hub.sqlite_storage`) is one database for all gateways; another
backend (PostgreSQL) implements the same methods. The uniqueness of a reading over
``(serial, device, ts, metric)`` and "one batch ingest is one transaction" are part of the
interface, not of SQLite.

Secrets are stored hashed, the same way by every backend (the helpers below): gateway keys
and upload tokens (high-entropy random strings) as SHA-256, one-time PINs (short, typed by
a person) salted with PBKDF2.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

#: (device, ts epoch ms, metric, value)
Row = tuple[str, int, str, float]

#: How long (ms) an expired upload token is kept before it is swept away.
UPLOAD_SWEEP_MS = 86_400_000


def secret_hash(secret: str) -> str:
    """How a gateway key or upload token is stored: SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    """A fresh gateway key or upload token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def normalize_pin(pin: str) -> str:
    """PINs are typed by people: ignore spaces and dashes."""
    return "".join(ch for ch in pin if ch.isalnum())


def new_pin() -> tuple[str, bytes, bytes]:
    """A fresh one-time PIN as shown to a person (``12345-67890``), its salt and its hash."""
    digits = f"{secrets.randbelow(10**10):010d}"
    pin = f"{digits[:5]}-{digits[5:]}"
    salt = secrets.token_bytes(16)
    return pin, salt, pin_hash(pin, salt)


def pin_hash(pin: str, salt: bytes) -> bytes:
    """How a PIN is stored: PBKDF2-SHA256 of its letters and digits, salted."""
    return hashlib.pbkdf2_hmac("sha256", normalize_pin(pin).encode("utf-8"), salt, 100_000)


def pin_matches(pin: str, salt: bytes, stored: bytes) -> bool:
    """Whether ``pin`` is the PIN stored as ``stored`` (constant-time comparison)."""
    return hmac.compare_digest(pin_hash(pin, salt), stored)


#: The fields of a gateway summary (``gateways()``, ``gateway()``), in order.
GATEWAY_FIELDS = (
    "serial",
    "created_at",
    "registered_at",
    "last_seen",
    "last_batch_id",
    "rows",
    "test_rows",
    "batches",
)
#: The fields of a summary's ``last_batch``, in order.
LAST_BATCH_FIELDS = (
    "batch_id",
    "rows",
    "new_rows",
    "first_ts",
    "last_ts",
    "mode",
    "test",
    "stored_at",
)


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

    def gateways(self) -> list[dict[str, Any]]:
        """Every gateway's summary (:data:`GATEWAY_FIELDS` but ``last_batch_id``, plus
        ``last_batch``: :data:`LAST_BATCH_FIELDS` or None), ordered by serial."""
        ...

    def gateway(self, serial: str) -> dict[str, Any] | None:
        """One gateway's summary as in :meth:`gateways`, or None."""
        ...

    def health(self) -> dict[str, Any]:
        """Facts for ``GET /api/v1/health`` (the database answers; how many gateways)."""
        ...

    def close(self) -> None: ...
