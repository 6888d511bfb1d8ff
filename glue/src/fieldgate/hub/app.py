"""The hub's HTTP API (CONTRACT §6) as a Flask application factory.

- ``POST /api/v1/register`` ``{"pin", "serial"}`` → ``201 {"gateway_key"}``
- ``POST /api/v1/batches`` (Bearer key, manifest JSON) → ``201 {"upload_url", "expires_at"}``
  or ``200 {"state": "stored"}`` when the batch is already stored
- ``PUT /api/v1/uploads/<token>`` (the zip) → ``201`` stored; ``200`` already stored;
  ``409`` checksum mismatch; ``403`` unknown or expired URL; ``413`` too large;
  ``400`` not a zip / truncated body; ``422`` manifest or CSV not acceptable
- ``GET /api/v1/health``, ``GET /api/v1/gateways``, ``GET /api/v1/gateways/<serial>``

Every error is JSON ``{"error": "<one sentence>"}`` and is logged with the gateway and batch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import yaml
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException

from fieldgate import __version__
from fieldgate.hub.backends import open_storage
from fieldgate.hub.storage import HubStorage, IngestError, Row
from fieldgate.names import BATCH_ID_RE, NAME_RE
from fieldgate.store import iso_utc, now_ms

log = logging.getLogger("fieldgate.hub")

CSV_NAME = "readings.csv"
MANIFEST_NAME = "manifest.yaml"
CSV_HEADER = ["device", "ts", "metric", "value"]
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_ROWS = 10_000_000


class ApiError(Exception):
    """An answer with an HTTP status and one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_manifest(m: Any) -> dict[str, Any]:
    """A manifest as the gateway announces it, validated (ApiError 422 naming the field)."""
    if not isinstance(m, dict):
        raise ApiError(422, "the manifest must be a JSON object")

    def need(key: str, ok: bool, what: str) -> None:
        if key not in m:
            raise ApiError(422, f"manifest: {key} is missing")
        if not ok:
            raise ApiError(422, f"manifest: {key} must be {what}, got {m[key]!r:.60}")

    need(
        "batch_id",
        isinstance(m.get("batch_id"), str) and bool(BATCH_ID_RE.match(m["batch_id"])),
        "a batch id (letters, digits, _ . : -)",
    )
    need(
        "serial",
        isinstance(m.get("serial"), str) and bool(NAME_RE.match(m["serial"])),
        "a gateway serial",
    )
    rows = m.get("rows")
    need(
        "rows",
        isinstance(rows, int) and not isinstance(rows, bool) and 1 <= rows <= MAX_ROWS,
        f"an integer from 1 to {MAX_ROWS}",
    )
    need(
        "sha256",
        isinstance(m.get("sha256"), str) and bool(SHA_RE.match(m["sha256"])),
        "64 lowercase hex digits",
    )
    for key in ("first_ts", "last_ts"):
        v = m.get(key)
        need(
            key,
            v is None or (isinstance(v, int) and not isinstance(v, bool)),
            "an integer (epoch ms) or null",
        )
    need("mode", m.get("mode") in ("LIVE", "TEST"), "LIVE or TEST (PASS batches are not sent)")
    need("type", isinstance(m.get("type"), str) and bool(m.get("type")), "a non-empty string")
    return m


MAX_TS = 2**53
MAX_FLOAT = 1.7976931348623157e308


def parse_rows(text: str) -> Iterator[Row]:
    """The readings of ``readings.csv``; raises IngestError naming the line.

    A reading needs a device and a metric, an integer ts in [0, 2**53) and a finite value.
    """
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header != CSV_HEADER:
        raise IngestError(f"readings.csv must start with the header {','.join(CSV_HEADER)}")
    try:
        for device, ts_s, metric, value_s in reader:
            ts = int(ts_s)
            value = float(value_s)
            if not (device and metric and 0 <= ts < MAX_TS and -MAX_FLOAT <= value <= MAX_FLOAT):
                raise IngestError(
                    f"readings.csv line {reader.line_num}: reading out of range "
                    f"({device!r:.40}, {ts}, {metric!r:.40}, {value})"
                )
            yield device, ts, metric, value
    except ValueError:
        raise IngestError(
            f"readings.csv line {reader.line_num}: expected device,ts,metric,value with an "
            "integer ts and a numeric value"
        ) from None


def create_app(
    db_path: str,
    *,
    upload_ttl_secs: float = 3600,
    max_upload_bytes: int = 256 * 1024 * 1024,
    storage_factory: Any = None,
) -> Flask:
    """The hub application over the SQLite database at ``db_path``.

    Each worker process opens its own storage connection on first use (after the fork).
    """
    app = Flask("fieldgate.hub")
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    factory = storage_factory or (lambda: open_storage(db_path, create=False))
    per_process: dict[int, HubStorage] = {}

    def storage() -> HubStorage:
        pid = os.getpid()
        if pid not in per_process:
            per_process[pid] = factory()
        return per_process[pid]

    def error(status: int, message: str) -> tuple[Response, int]:
        ctx = getattr(g, "ctx", "")
        log.warning(
            "%s %s -> %d%s: %s",
            request.method,
            request.path.split("/uploads/")[0]
            + ("/uploads/…" if "/uploads/" in request.path else ""),
            status,
            ctx,
            message,
        )
        return jsonify(error=message), status

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        return error(exc.status, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        messages = {
            404: "no such endpoint",
            405: f"method {request.method} is not allowed here",
            413: f"the upload is larger than this hub accepts ({max_upload_bytes} bytes)",
        }
        return error(status, messages.get(status, exc.description or exc.name))

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> tuple[Response, int]:
        log.exception("internal error on %s %s", request.method, request.path)
        return jsonify(error=f"internal hub error: {type(exc).__name__}"), 500

    def json_body() -> dict[str, Any]:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def gateway_from_key() -> str:
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

    @app.get("/api/v1/health")
    def health() -> Response:
        return jsonify(status="ok", version=__version__, **storage().health())

    @app.post("/api/v1/register")
    def register() -> tuple[Response, int]:
        body = json_body()
        pin, serial = body.get("pin"), body.get("serial")
        if not isinstance(pin, str) or not isinstance(serial, str) or not NAME_RE.match(serial):
            raise ApiError(400, "register needs a JSON object with a 'pin' and a 'serial'")
        g.ctx = f" [{serial}]"
        key = storage().register(serial, pin)
        if key is None:
            raise ApiError(
                403, f"the PIN is not valid for gateway {serial} (wrong, already used or expired)"
            )
        log.info("gateway %s registered: new key issued", serial)
        return jsonify(gateway_key=key), 201

    @app.post("/api/v1/batches")
    def offer_batch() -> tuple[Response, int]:
        serial = gateway_from_key()
        g.ctx = f" [{serial}]"
        manifest = check_manifest(json_body())
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
        token, expires = st.open_upload(serial, manifest, upload_ttl_secs)
        return jsonify(
            upload_url=f"{request.host_url}api/v1/uploads/{token}", expires_at=iso_utc(expires)
        ), 201

    @app.put("/api/v1/uploads/<token>")
    def put_batch(token: str) -> tuple[Response, int]:
        st = storage()
        up = st.find_upload(token)
        if up is None:
            raise ApiError(
                403, "the upload URL is not valid; ask for one with POST /api/v1/batches"
            )
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
        body = read_body(max_upload_bytes)
        csv_bytes, inner = open_zip(body)
        sha = hashlib.sha256(csv_bytes).hexdigest()
        if sha != m["sha256"]:
            raise ApiError(
                409,
                f"checksum mismatch: readings.csv has sha256 {sha}, the manifest says "
                f"{m['sha256']}; nothing was stored",
            )
        for key in ("batch_id", "serial", "rows", "sha256"):
            if inner.get(key) != m[key]:
                raise ApiError(
                    422,
                    f"manifest.yaml says {key} {inner.get(key)!r:.70} but the batch was "
                    f"announced with {m[key]!r}; nothing was stored",
                )
        try:
            text = csv_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "readings.csv is not UTF-8 text; nothing was stored") from None
        try:
            new = st.ingest(
                up.serial,
                up.batch_id,
                parse_rows(text),
                test=m["mode"] == "TEST",
                manifest=m,
                expected_rows=m["rows"],
            )
        except IngestError as exc:
            raise ApiError(422, f"{exc}; nothing was stored") from None
        st.close_upload(token)
        log.info(
            "stored batch %s from %s: %d readings, %d new%s",
            up.batch_id,
            up.serial,
            m["rows"],
            new,
            " (TEST)" if m["mode"] == "TEST" else "",
        )
        return jsonify(state="stored", rows=m["rows"], new_rows=new), 201

    @app.get("/api/v1/gateways")
    def gateways() -> Response:
        return jsonify(gateways=[_summary(d) for d in storage().gateways()])

    @app.get("/api/v1/gateways/<serial>")
    def gateway(serial: str) -> Response | tuple[Response, int]:
        d = storage().gateway(serial)
        if d is None:
            raise ApiError(404, f"no gateway {serial} on this hub")
        return jsonify(_summary(d))

    return app


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for key in ("created_at", "registered_at", "last_seen"):
        out[key] = iso_utc(out[key]) if out.get(key) else None
    if out.get("last_batch") and out["last_batch"].get("stored_at"):
        out["last_batch"]["stored_at"] = iso_utc(out["last_batch"]["stored_at"])
    return out


def read_body(limit: int) -> bytes:
    """The whole request body; 400 when the client sent less than it announced."""
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, f"the upload is {length} bytes; this hub accepts at most {limit}")
    stream = request.stream
    chunks: list[bytes] = []
    got = 0
    try:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
            if got > limit:
                raise ApiError(413, f"the upload is larger than this hub accepts ({limit} bytes)")
            chunks.append(chunk)
    except (ClientDisconnected, OSError) as exc:
        raise ApiError(
            400,
            f"the upload body was cut off after {got} of {length} bytes "
            f"({exc.__class__.__name__}); nothing was stored",
        ) from None
    except Exception as exc:  # gunicorn's NoMoreData and friends: a short body
        if exc.__class__.__name__ in ("NoMoreData", "ChunkMissingTerminator", "InvalidChunkSize"):
            raise ApiError(
                400,
                f"the upload body was cut off after {got} of {length} bytes; nothing was stored",
            ) from None
        raise
    if length is not None and got != length:
        raise ApiError(
            400, f"the upload body was cut off after {got} of {length} bytes; nothing was stored"
        )
    if not got:
        raise ApiError(400, "the upload body is empty; send the batch zip")
    return b"".join(chunks)


def open_zip(body: bytes) -> tuple[bytes, dict[str, Any]]:
    """readings.csv and the parsed manifest.yaml of a batch zip (400/422 when malformed)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
    except zipfile.BadZipFile:
        raise ApiError(
            400, "the upload is not a zip archive (truncated or corrupted); nothing was stored"
        ) from None
    with zf:
        names = set(zf.namelist())
        for name in (CSV_NAME, MANIFEST_NAME):
            if name not in names:
                raise ApiError(422, f"the batch zip has no {name}; nothing was stored")
        try:
            csv_bytes = zf.read(CSV_NAME)
            manifest_text = zf.read(MANIFEST_NAME)
        except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as exc:
            raise ApiError(400, f"the batch zip is corrupted ({exc}); nothing was stored") from None
    try:
        inner = yaml.safe_load(manifest_text)
    except yaml.YAMLError:
        raise ApiError(422, "manifest.yaml is not valid YAML; nothing was stored") from None
    if not isinstance(inner, dict):
        raise ApiError(422, "manifest.yaml is not a mapping; nothing was stored")
    return csv_bytes, inner
