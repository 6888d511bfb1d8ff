"""What gateways call (docs/contract.md §6): register, offer a batch, upload its zip.

- ``POST /api/v1/register`` ``{"pin", "serial"}`` → ``201 {"gateway_key"}``
- ``POST /api/v1/batches`` (Bearer key, manifest JSON) → ``201 {"upload_url", "expires_at"}``
  or ``200 {"state": "stored"}`` when the batch is already stored
- ``PUT /api/v1/uploads/<token>`` (the zip) → ``201`` stored; ``200`` already stored;
  ``409`` checksum mismatch; ``403`` unknown or expired URL; ``413`` too large;
  ``400`` not a zip / truncated body; ``422`` manifest or CSV not acceptable
- ``POST /api/v1/heartbeat`` (Bearer key, the gateway's ``status --json``, at most
  :data:`MAX_HEARTBEAT_BYTES`) → ``204``: the hub keeps it as the gateway's last status

The batch format and its checks are :mod:`fieldgate.batchfile`, the gateway's own.
"""

from __future__ import annotations

import json
import logging
import tempfile

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected

from fieldgate import batchfile
from fieldgate.hub.auth import claim_or_refuse, client_address
from fieldgate.hub.storage import IngestError
from fieldgate.hub.web import (
    ApiError,
    ClientTooSlow,
    json_body,
    read_body,
    settings,
    storage,
)
from fieldgate.names import is_name
from fieldgate.store import iso_utc, now_ms

log = logging.getLogger("fieldgate.hub")

uploads = Blueprint("uploads", __name__, url_prefix="/api/v1")

#: The longest PIN looked at (a PIN is 11 characters; PBKDF2 of a long one costs more).
MAX_PIN = 64
#: What a refused upload adds to its reason.
NOTHING_STORED = "; nothing was stored"
#: The largest heartbeat body (a status is a few kilobytes; this leaves room for many inputs).
MAX_HEARTBEAT_BYTES = 64 * 1024


def gateway_from_key() -> str:
    """The gateway whose key authorises this request (401 without a valid one)."""
    auth = request.headers.get("Authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing 'Authorization: Bearer <gateway key>'")
    serial = storage().serial_for_key(key.strip())
    if serial is None:
        raise ApiError(
            401,
            "the gateway key is not valid (unknown or revoked); register again with a new PIN",
        )
    return serial


#: Registration attempts are counted over this window (ms) ...
PIN_WINDOW_MS = 15 * 60 * 1000
#: ... at most this many per gateway serial, and per client address (wrong PINs and
#: right ones alike; a registration that succeeds clears its serial's count).
PIN_SERIAL_LIMIT = 10
PIN_ADDRESS_LIMIT = 30


def limit_registrations(serial: str) -> None:
    """Count this registration attempt, or refuse it with 429 and ``Retry-After``.

    The count lives in the database (shared by every worker and hub process); counting and
    recording are one transaction, before the PIN is checked, so of guesses sent at once
    exactly as many are checked as the limit leaves room for. An attempt that is refused
    (the limit was reached already) writes nothing."""
    keys = {f"serial:{serial}": PIN_SERIAL_LIMIT, f"pinaddr:{client_address()}": PIN_ADDRESS_LIMIT}
    claim_or_refuse(keys, now_ms(), PIN_WINDOW_MS, "registration attempts")


@uploads.post("/register")
def register() -> tuple[Response, int]:
    body = json_body()
    pin, serial = body.get("pin"), body.get("serial")
    if not isinstance(pin, str) or not is_name(serial) or len(pin) > MAX_PIN:
        raise ApiError(400, "register needs a JSON object with a 'pin' and a 'serial'")
    g.ctx = f" [{serial}]"
    limit_registrations(serial)
    st = storage()
    key = st.register(serial, pin)
    if key is None:
        raise ApiError(
            403, f"the PIN is not valid for gateway {serial} (wrong, already used or expired)"
        )
    st.clear_login_failures(f"serial:{serial}")
    log.info("gateway %s registered: new key issued", serial)
    return jsonify(gateway_key=key), 201


@uploads.post("/batches")
def offer_batch() -> tuple[Response, int]:
    serial = gateway_from_key()
    g.ctx = f" [{serial}]"
    try:
        manifest = batchfile.check_manifest(json_body())
    except batchfile.BatchFileError as exc:
        raise ApiError(exc.status, str(exc)) from None
    g.ctx = f" [{serial} {manifest['batch_id']}]"
    if manifest["serial"] != serial:
        raise ApiError(403, f"this key belongs to gateway {serial}, not {manifest['serial']}")
    st = storage()
    st.touch(serial)
    stored = st.stored_batch(serial, manifest["batch_id"])
    if stored is not None:
        if stored.sha256 and stored.sha256 != manifest["sha256"]:
            raise ApiError(
                409,
                f"batch {manifest['batch_id']} is already stored with other content "
                f"(sha256 {stored.sha256})",
            )
        return jsonify(state="stored"), 200
    token, expires = st.open_upload(serial, manifest, settings().upload_ttl_secs)
    return jsonify(
        upload_url=f"{request.host_url}api/v1/uploads/{token}", expires_at=iso_utc(expires)
    ), 201


@uploads.post("/heartbeat")
def heartbeat() -> tuple[str, int]:
    """Keep the gateway's status (``fieldgate status --json``) and the time it came."""
    serial = gateway_from_key()
    g.ctx = f" [{serial}]"
    length = request.content_length
    if length is not None and length > MAX_HEARTBEAT_BYTES:
        raise ApiError(413, f"a heartbeat is at most {MAX_HEARTBEAT_BYTES} bytes, not {length}")
    raw = request.stream.read(MAX_HEARTBEAT_BYTES + 1)
    if len(raw) > MAX_HEARTBEAT_BYTES:
        raise ApiError(413, f"a heartbeat is at most {MAX_HEARTBEAT_BYTES} bytes")
    try:
        status = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        status = None
    if not isinstance(status, dict):
        raise ApiError(400, "a heartbeat is the gateway's status as a JSON object")
    storage().record_heartbeat(serial, status)
    return "", 204


@uploads.put("/uploads/<token>")
def put_batch(token: str) -> tuple[Response, int]:
    st = storage()
    up = st.find_upload(token)
    if up is None:
        raise ApiError(403, "the upload URL is not valid; ask for one with POST /api/v1/batches")
    g.ctx = f" [{up.serial} {up.batch_id}]"
    if up.expires_at < now_ms():
        raise ApiError(
            403,
            f"the upload URL expired at {iso_utc(up.expires_at)}; ask for a new one with "
            "POST /api/v1/batches",
        )
    m = up.manifest
    stored = st.stored_batch(up.serial, up.batch_id)
    if stored is not None and stored.sha256 == m["sha256"]:
        st.close_upload(token)
        return jsonify(state="stored"), 200
    cfg = settings()
    with spool_body(cfg.max_upload_bytes, cfg.spool_memory_bytes) as body:
        try:
            with batchfile.open_batch(body) as batch:
                batchfile.check_inner_manifest(batch.manifest, m)
                # parsed whole (its SHA-256 and names checked) before any lock is taken
                readings = batch.table(m)
                new = st.ingest(
                    up.serial,
                    up.batch_id,
                    readings,
                    test=m["mode"] == "TEST",
                    manifest=m,
                    expected_rows=m["rows"],
                )
        except batchfile.BatchFileError as exc:
            raise ApiError(exc.status, f"{exc}{NOTHING_STORED}") from None
        except IngestError as exc:
            raise ApiError(422, f"{exc}{NOTHING_STORED}") from None
    st.close_upload(token)
    if new is None:  # another request stored this batch while this one was arriving
        return jsonify(state="stored"), 200
    test = " (TEST)" if m["mode"] == "TEST" else ""
    log.info(
        "stored batch %s from %s: %d readings, %d new%s",
        up.batch_id,
        up.serial,
        m["rows"],
        new,
        test,
    )
    return jsonify(state="stored", rows=m["rows"], new_rows=new), 201


#: gunicorn's exceptions for a request body that ended early.
_SHORT_BODY = ("NoMoreData", "ChunkMissingTerminator", "InvalidChunkSize")
#: How much of the body is read at a time.
CHUNK = 1 << 20


def spool_body(limit: int, memory: int) -> tempfile.SpooledTemporaryFile[bytes]:
    """The request body in a spooled temporary file (in memory up to ``memory`` bytes,
    then on disk), rewound; 413 as soon as it passes ``limit``, 400 when the client sent
    less than it announced. The body is never whole in memory."""
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, f"the upload is {length} bytes; this hub accepts at most {limit}")
    spool = tempfile.SpooledTemporaryFile(max_size=memory)  # noqa: SIM115 (returned open)
    try:
        got = 0
        while chunk := _read_some(got, length):
            got += len(chunk)
            if got > limit:
                raise ApiError(413, f"the upload is larger than this hub accepts ({limit} bytes)")
            spool.write(chunk)
        if length is not None and got != length:
            raise ApiError(400, _cut_off(got, length))
        if not got:
            raise ApiError(400, "the upload body is empty; send the batch zip")
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def _cut_off(got: int, length: int | None, why: str = "") -> str:
    return f"the upload body was cut off after {got} of {length} bytes{why}{NOTHING_STORED}"


def _read_some(got: int, length: int | None) -> bytes:
    """The next piece of the body; 400 when the client went away or sent a short body."""
    try:
        return read_body(CHUNK)
    except ClientTooSlow:
        raise  # 408 (fieldgate.hub.app)
    except (ClientDisconnected, OSError) as exc:
        raise ApiError(400, _cut_off(got, length, f" ({exc.__class__.__name__})")) from None
    except Exception as exc:  # gunicorn's NoMoreData and friends: a short body
        if exc.__class__.__name__ in _SHORT_BODY:
            raise ApiError(400, _cut_off(got, length)) from None
        raise
