"""User passwords: hashed with scrypt (a slow, memory-hard KDF from the standard library).

A stored hash carries its parameters and salt, ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``,
so the cost can be raised later without breaking existing users (a new hash is made with
the current :data:`PARAMS` whenever a password is set). The default is the OWASP Password
Storage Cheat Sheet's minimum for scrypt: N=2^17, r=8, p=1 (128 MiB and about half a
second to a second of one core per check on small hardware).

Checking is expensive on purpose; :class:`VerifiedCache` lets a worker skip the KDF for
credentials it verified a moment ago (HTTP Basic sends them with every request), and
:data:`KDF_SLOTS` bounds how many run at once in a process (memory).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

#: scrypt's cost parameters for new hashes.
PARAMS = {"n": 2**17, "r": 8, "p": 1}
#: Bytes of salt and of derived key.
SALT_BYTES = 16
KEY_BYTES = 32
#: The largest parameters a stored hash may ask for (a bad hash must not exhaust memory).
MAX_N = 2**20
MAX_R = 16
MAX_P = 16
#: Passwords people choose: at least this many characters, at most MAX_PASSWORD.
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
#: At most this many KDF computations at once per process (each takes 128 r n bytes).
KDF_SLOTS = threading.BoundedSemaphore(2)


class PasswordError(ValueError):
    """A password that may not be set (one sentence)."""


def check_new_password(password: str) -> None:
    """Refuse a password too short or too long to set."""
    if len(password) < MIN_PASSWORD:
        raise PasswordError(f"the password must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise PasswordError(f"the password must be at most {MAX_PASSWORD} characters")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    with KDF_SLOTS:
        return hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=n,
            r=r,
            p=p,
            maxmem=130 * r * n + (1 << 20),
            dklen=KEY_BYTES,
        )


def hash_password(password: str, *, n: int | None = None, r: int | None = None) -> str:
    """The string to store for ``password`` (fresh salt, current :data:`PARAMS`)."""
    n = n or PARAMS["n"]
    r = r or PARAMS["r"]
    p = PARAMS["p"]
    salt = secrets.token_bytes(SALT_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p))}"


@dataclass(frozen=True)
class _Parsed:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _parse(stored: str) -> _Parsed | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        return None
    if not (1 < n <= MAX_N and n & (n - 1) == 0 and 0 < r <= MAX_R and 0 < p <= MAX_P):
        return None
    return _Parsed(n, r, p, salt, key)


def is_password_hash(stored: str) -> bool:
    """Whether ``stored`` is a hash this module can check."""
    return _parse(stored) is not None


#: Checked when a user name is unknown, so that the answer takes as long as for a known one.
_DUMMY = "$".join(
    ("scrypt", *(str(PARAMS[k]) for k in "nrp"), _b64(b"0" * SALT_BYTES), _b64(b"0" * KEY_BYTES))
)


def verify_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` is the one hashed as ``stored`` (None: an unknown user, checked
    against a dummy hash at the same cost; always False)."""
    parsed = _parse(stored if stored is not None else _DUMMY)
    if parsed is None:
        return False
    derived = _scrypt(password, parsed.salt, parsed.n, parsed.r, parsed.p)
    return stored is not None and hmac.compare_digest(derived, parsed.key)


class VerifiedCache:
    """Credentials verified recently in this process, so that HTTP Basic does not pay the
    KDF on every request. Entries are keyed by an HMAC (with a per-process random key) of
    the name, the password and the stored hash: a changed password or a removed user
    misses, and the process never holds a password in the clear after the request."""

    def __init__(self, ttl_secs: float = 300, size: int = 1024) -> None:
        self.ttl = ttl_secs
        self.size = size
        self._key = secrets.token_bytes(32)
        self._entries: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def _id(self, name: str, password: str, stored: str) -> bytes:
        msg = "\x00".join((name, password, stored)).encode("utf-8")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def verify(self, name: str, password: str, stored: str | None) -> bool:
        """:func:`verify_password`, remembered for ``ttl_secs`` when it succeeds."""
        if stored is None:
            return verify_password(password, None)
        key = self._id(name, password, stored)
        now = time.monotonic()
        with self._lock:
            until = self._entries.get(key)
        if until is not None and until > now:
            return True
        if not verify_password(password, stored):
            return False
        with self._lock:
            if len(self._entries) >= self.size:
                self._entries = {k: t for k, t in self._entries.items() if t > now}
                if len(self._entries) >= self.size:
                    self._entries.clear()
            self._entries[key] = now + self.ttl
        return True
