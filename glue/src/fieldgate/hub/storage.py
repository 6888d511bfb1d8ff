"""What the hub needs from its database: the backend-neutral storage interface.

:class:`HubStorage` is the interface the web app, ``hub import`` and the ``fieldgate hub``
commands use. Two backends implement it with the same SQL where they can
(:mod:`fieldgate.hub.sqlstore`): one SQLite file (:mod:`fieldgate.hub.sqlite_storage`, the
embedded default) and PostgreSQL (:mod:`fieldgate.hub.pg_storage`, for large fleets).
The guarantees are part of the interface, not of a backend:

- a reading is unique over ``(serial, device, ts, metric)``; a batch is ingested in one
  transaction, all or nothing, and at most once per ``(serial, batch_id)``: of several
  ingests of one batch at the same time exactly one stores it, and ``new_rows`` is exact;
- PIN use and key issue are race-free between processes (one PIN, one key);
- every method is safe to call from several processes and threads at once, each with its
  own storage object (the web server runs several workers with several threads).

Secrets are stored hashed, the same way by every backend (the helpers below): gateway keys
and upload tokens (high-entropy random strings) as SHA-256, one-time PINs (short, typed by
a person) salted with PBKDF2, user passwords with scrypt (:mod:`fieldgate.hub.passwords`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fieldgate.batchfile import Columns

if TYPE_CHECKING:
    import pyarrow as pa

#: (device, ts epoch ms, metric, value)
Row = tuple[str, int, str, float]

#: How long (ms) an expired upload token is kept before it is swept away.
UPLOAD_SWEEP_MS = 86_400_000

#: The domain of a gateway nobody put in a domain yet.
DEFAULT_DOMAIN = "default"

#: The domains a caller may see: a set of names, or None for every domain (an admin).
Domains = frozenset[str] | None


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
    return hmac.compare_digest(pin_hash(pin, salt), bytes(stored))


#: The fields of a gateway summary (``gateways()``, ``gateway()``), in order.
GATEWAY_FIELDS = (
    "serial",
    "domain",
    "created_at",
    "registered_at",
    "last_seen",
    "last_heartbeat",
    "last_batch_id",
    "rows",
    "test_rows",
    "batches",
    "status",
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
#: The fields of one series in :meth:`HubStorage.extent`, in order.
EXTENT_FIELDS = ("device", "metric", "first_ts", "last_ts", "count")
#: The fields of one bucket in :meth:`HubStorage.buckets`, in order.
BUCKET_FIELDS = ("ts", "min", "max", "mean", "count")


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


@dataclass(frozen=True)
class User:
    """A person (or a program) who reads the hub: domains decide which gateways they see."""

    name: str
    password_hash: str
    admin: bool
    domains: tuple[str, ...]
    created_at: int
    updated_at: int

    @property
    def visible(self) -> Domains:
        """What this user may see: None (every domain) for an admin."""
        return None if self.admin else frozenset(self.domains)


@dataclass(frozen=True)
class Series:
    """One (device, metric) of a gateway: its id and what it holds."""

    id: int
    first_ts: int | None
    last_ts: int | None
    count: int


class HubStorage(Protocol):
    """What the hub needs from its database (see the module docstring for the guarantees)."""

    #: Whether opening it created the database (SQLite) or its tables (PostgreSQL).
    created: bool

    # Registration ---------------------------------------------------------------------------

    def create_pin(self, serial: str, valid_secs: int) -> str:
        """A fresh one-time PIN for ``serial`` (stored hashed), valid for ``valid_secs``."""
        ...

    def register(self, serial: str, pin: str) -> str | None:
        """Redeem a PIN: a new gateway key (older keys of the serial revoked), or None.

        Of concurrent redemptions of one PIN exactly one gets a key."""
        ...

    def serial_for_key(self, key: str) -> str | None:
        """The gateway a key belongs to, or None for an unknown or revoked key."""
        ...

    # Uploads --------------------------------------------------------------------------------

    def stored_batch(self, serial: str, batch_id: str) -> StoredBatch | None: ...

    def open_upload(
        self, serial: str, manifest: dict[str, Any], valid_secs: float
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
        rows: Iterable[Row] | Iterable[Columns] | pa.Table,
        *,
        test: bool = False,
        manifest: dict[str, Any] | None = None,
        expected_rows: int | None = None,
    ) -> int | None:
        """Store the readings of one batch exactly once; how many were new, or None when the
        batch ``(serial, batch_id)`` is already stored (then ``rows`` is not read, unless
        another call stored it meanwhile: a backend may read them before it takes the
        write lock).

        All or nothing, in one transaction: a reading already held for
        ``(serial, device, ts, metric)`` is skipped, so readings sent in several batches
        (a restored store, an export imported after its batches were uploaded) are stored
        once. ``rows`` are a :class:`pyarrow.Table` (:mod:`fieldgate.hub.table`: what an
        upload is parsed into before the write lock), or rows or
        :class:`~fieldgate.batchfile.Columns` of rows, a lazy iterator either way; if
        it raises, or yields a number of rows other than ``expected_rows`` (IngestError),
        nothing is stored. ``test`` flags the
        rows as test data.
        """
        ...

    def touch(self, serial: str) -> None:
        """Note that the gateway was seen now."""
        ...

    def record_heartbeat(self, serial: str, status: dict[str, Any]) -> None:
        """Keep a gateway's last reported status (``fieldgate status --json``), its time, and
        its brief (:func:`fieldgate.hub.overview.brief`: the few figures the fleet page shows,
        read without the whole status by :meth:`gateways` with ``brief``)."""
        ...

    # Gateways and domains -------------------------------------------------------------------

    def gateways(self, domains: Domains = None, *, brief: bool = False) -> list[dict[str, Any]]:
        """The summaries of the gateways in ``domains`` (None: all), ordered by serial:
        :data:`GATEWAY_FIELDS` but ``last_batch_id``, plus ``last_batch``
        (:data:`LAST_BATCH_FIELDS` or None); with ``brief``, ``brief`` (the last heartbeat's
        brief, or None) instead of ``status``."""
        ...

    def gateway(self, serial: str, domains: Domains = None) -> dict[str, Any] | None:
        """One gateway's summary as in :meth:`gateways`, or None (also when it is in none
        of ``domains``: the caller cannot tell it exists)."""
        ...

    def set_domain(self, serial: str, domain: str) -> str | None:
        """Put a gateway in ``domain`` (a gateway not known yet is created); its previous
        domain, or None when it was new."""
        ...

    # Users ----------------------------------------------------------------------------------

    def user(self, name: str) -> User | None: ...

    def users(self) -> list[User]:
        """Every user, ordered by name."""
        ...

    def add_user(
        self, name: str, password_hash: str, domains: Iterable[str], *, admin: bool
    ) -> bool:
        """Create a user; False (nothing changed) when the name is taken."""
        ...

    def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        domains: Iterable[str] | None = None,
        admin: bool | None = None,
    ) -> bool:
        """Change what is given; False when there is no such user."""
        ...

    def remove_user(self, name: str) -> bool:
        """Delete a user and their domains; False when there was no such user."""
        ...

    # Login failures (rate limits shared by every worker) ------------------------------------

    def login_failures(self, keys: Iterable[str], since: int) -> dict[str, tuple[int, int]]:
        """For each key with failures at or after ``since`` (epoch ms): (count, oldest)."""
        ...

    def claim_attempt(
        self, limits: Mapping[str, int], at: int, *, since: int
    ) -> dict[str, tuple[int, int]]:
        """Check and record an attempt at once, atomically across workers and processes:
        the counts since ``since`` (as :meth:`login_failures`) before this attempt; when
        every key is under its limit, the attempt is recorded under every key (as a failure
        until :meth:`forget_attempt`), so of attempts made at once exactly as many pass as
        the limits leave room for. Drops failures older than ``since``."""
        ...

    def forget_attempt(self, keys: Iterable[str], at: int) -> None:
        """Remove one attempt :meth:`claim_attempt` recorded at ``at`` under each key (it
        succeeded: it was no failure)."""
        ...

    def clear_login_failures(self, key: str) -> None: ...

    def secret(self, name: str) -> str:
        """A random secret kept in the database (created on first use, the same for every
        worker and every hub process sharing the database), e.g. the session signing key."""
        ...

    # Reading --------------------------------------------------------------------------------

    def series(self, serial: str, device: str, metric: str) -> Series | None:
        """What a gateway holds of one device and metric, or None."""
        ...

    def extent(self, serial: str, device: str | None = None) -> list[dict[str, Any]]:
        """Per device and metric of a gateway (of one device): :data:`EXTENT_FIELDS`,
        ordered by device and metric; series emptied by retention are left out."""
        ...

    def latest(self, serial: str) -> list[tuple[str, str, int, float, int]]:
        """Per device and metric of a gateway holding readings: (device, metric, ts and
        value of its latest reading, count), ordered by device and metric."""
        ...

    def readings(self, series_id: int, start: int, end: int) -> Iterator[tuple[int, float]]:
        """The (ts, value) of a series with start <= ts < end, in time order, streamed: the
        backend fetches them in chunks; close the iterator when stopping early."""
        ...

    def buckets(
        self, series_id: int, start: int, end: int, every: int, origin: int
    ) -> list[tuple[int, float, float, float, int]]:
        """Statistics per time bucket computed by the database: (bucket start, min, max,
        mean, count) of the readings with start <= ts < end, buckets of ``every`` ms counted
        from ``origin`` (<= start); only buckets holding readings, in time order."""
        ...

    # Retention ------------------------------------------------------------------------------

    def delete_before(self, cutoff: int, max_rows: int) -> int:
        """Delete readings older than ``cutoff`` (epoch ms) of one series in one short
        transaction: at most ``max_rows``, except that the SQLite backend always takes its
        oldest block whole, however many readings it holds (one row to delete; the step's
        cost is in rows, not readings). How many readings were deleted (0: nothing older is
        left)."""
        ...

    # The database ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Facts for ``GET /api/v1/health`` (the database answers; how many gateways)."""
        ...

    def close(self) -> None: ...
