"""Who is calling and what they may see: the one place the hub decides it for people.

Every read endpoint (and every page) needs a user (docs/contract.md §11): HTTP Basic
credentials with the request, or the session a login started (Flask's signed cookie, key
kept in the database so every worker and hub process shares it; HttpOnly, SameSite=Lax,
Secure over HTTPS). :func:`caller` answers for the current request; :func:`require_user`
makes a blueprint answer 401 without one. A caller sees the gateways of their domains
(an admin every gateway); a gateway outside them does not exist for them (404).

Failed logins are rate-limited per user name and per client address in the database, so
the limits hold across workers: after :data:`USER_LIMIT` failures for one name, or
:data:`ADDRESS_LIMIT` from one address, within :data:`WINDOW_MS`, further attempts get
``429`` with ``Retry-After`` (seconds) until the oldest failure leaves the window, without
the password being checked. The check and the record are one step (the attempt is recorded
as a failure before its password is checked, in the same transaction as the count), so a
burst of attempts at once gets exactly as many password checks as the limit leaves. A
success takes its attempt back and clears the name's failures.

Gateways do not log in: their endpoints (:mod:`fieldgate.hub.uploads`) use gateway keys.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
from dataclasses import dataclass

from flask import Blueprint, Flask, g, request, session
from flask.sessions import SecureCookieSessionInterface

from fieldgate.hub.storage import Domains, User
from fieldgate.hub.web import ApiError, settings, settings_of, storage
from fieldgate.store import now_ms

#: Failed logins counted over this window (ms).
WINDOW_MS = 15 * 60 * 1000
#: Failures allowed per user name, and per client address, within the window.
USER_LIMIT = 10
ADDRESS_LIMIT = 50
#: How long a login session lasts.
SESSION_LIFETIME = dt.timedelta(hours=12)
#: What a client learns when its credentials are refused (never which part was wrong).
REFUSED = "wrong user name or password"
#: The longest user name looked up (longer ones are refused before any lookup).
MAX_NAME = 256
#: The realm HTTP Basic names.
REALM = 'Basic realm="fieldgate hub", charset="UTF-8"'


@dataclass(frozen=True)
class Caller:
    """An authenticated person or program."""

    name: str
    admin: bool
    domains: frozenset[str]
    via: str  # "basic" or "session"

    @property
    def visible(self) -> Domains:
        """The domains this caller sees: None for every domain (an admin)."""
        return None if self.admin else self.domains

    def sees(self, domain: str) -> bool:
        return self.admin or domain in self.domains


def _caller_of(user: User, via: str) -> Caller:
    return Caller(user.name, user.admin, frozenset(user.domains), via)


def _fingerprint(user: User) -> str:
    """Ties a session to the password it was started with: setting a new password (or
    removing the user) ends every session."""
    import hashlib

    return hashlib.sha256(user.password_hash.encode("utf-8")).hexdigest()[:32]


def client_address() -> str:
    return request.remote_addr or "unknown"


def claim_or_refuse(
    limits: dict[str, int], now: int, window_ms: int, what: str
) -> dict[str, tuple[int, int]]:
    """Record this attempt under every key of ``limits`` (key -> most attempts in the
    window), or refuse it with 429 and ``Retry-After`` (seconds until the oldest counted
    attempt leaves the window) when a key has reached its limit; atomic across workers
    (:meth:`~fieldgate.hub.storage.HubStorage.claim_attempt`). Keys are ``kind:value``;
    the message names the kind. The counts before this attempt (key -> (count, oldest))."""
    counts = storage().claim_attempt(limits, now, since=now - window_ms)
    for key, (count, oldest) in counts.items():
        if count >= limits[key]:
            wait = max(1, math.ceil((oldest + window_ms - now) / 1000))
            kind = key.partition(":")[0]
            whom = {"user": "this user name", "serial": "this gateway"}.get(kind, "this address")
            raise ApiError(
                429,
                f"too many {what} for {whom}; try again in {wait} s",
                {"Retry-After": str(wait)},
            )
    return counts


def authenticate(name: str, password: str) -> Caller:
    """Check a user name and password for this request's client, under the rate limits:
    the caller, or ApiError 401 (wrong) or 429 (too many failures)."""
    if "\x00" in name or len(name) > MAX_NAME:
        raise ApiError(400, f"a user name has at most {MAX_NAME} characters and no NUL")
    st = storage()
    now = now_ms()
    keys = {f"user:{name}": USER_LIMIT, f"addr:{client_address()}": ADDRESS_LIMIT}
    before = claim_or_refuse(keys, now, WINDOW_MS, "failed logins")  # a failure until it passes
    user = st.user(name)
    if not settings().verified.verify(name, password, user.password_hash if user else None):
        raise ApiError(401, REFUSED, {"WWW-Authenticate": REALM})
    assert user is not None
    st.forget_attempt(keys, now)
    if f"user:{name}" in before:
        st.clear_login_failures(f"user:{name}")
    return _caller_of(user, "basic")


def _from_session() -> Caller | None:
    name, mark = session.get("user"), session.get("mark")
    if not isinstance(name, str) or not isinstance(mark, str):
        return None
    user = storage().user(name)
    if user is None or _fingerprint(user) != mark:
        session.clear()
        return None
    return _caller_of(user, "session")


def _from_basic() -> Caller | None:
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, sep, password = (
            base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        )
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError(
            401, "malformed HTTP Basic credentials", {"WWW-Authenticate": REALM}
        ) from None
    if not sep or not name:
        raise ApiError(401, "malformed HTTP Basic credentials", {"WWW-Authenticate": REALM})
    return authenticate(name, password)


def caller() -> Caller:
    """The user of this request (HTTP Basic, else the session), or ApiError 401/429."""
    if "caller" not in g:
        found = _from_basic() or _from_session()
        if found is None:
            raise ApiError(
                401,
                "this needs a user: HTTP Basic credentials or a login session",
                {"WWW-Authenticate": REALM},
            )
        g.caller = found
    return g.caller  # type: ignore[no-any-return]


def require_user(bp: Blueprint) -> Blueprint:
    """Make every endpoint of ``bp`` answer 401 without a user."""

    def check() -> None:
        caller()

    bp.before_request(check)
    return bp


def log_in(name: str, password: str) -> Caller:
    """Check the credentials (rate-limited) and start a session for them: what a login
    form or ``POST /api/v1/login`` calls."""
    found = authenticate(name, password)
    user = storage().user(found.name)
    assert user is not None
    session.clear()
    session.permanent = True
    session["user"] = user.name
    session["mark"] = _fingerprint(user)
    g.caller = Caller(found.name, found.admin, found.domains, "session")
    return g.caller  # type: ignore[no-any-return]


def log_out() -> None:
    """End this client's session (the cookie is cleared)."""
    session.clear()


class HubSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions with the signing key from the hub's database and the
    Secure flag whenever the request came over HTTPS (directly or through a trusted proxy)."""

    def get_signing_serializer(self, app: Flask):  # type: ignore[no-untyped-def]
        if not app.secret_key:
            app.secret_key = settings_of(app).storage().secret("session")
        return super().get_signing_serializer(app)

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure


def install(app: Flask) -> None:
    """Sessions as this module wants them."""
    app.session_interface = HubSessions()
    app.config.update(
        SESSION_COOKIE_NAME="fieldgate_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )
