"""``GET /api/v1/health`` and the gateway summaries (``/api/v1/gateways[/<serial>]``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from fieldgate import __version__
from fieldgate.hub.web import ApiError, storage
from fieldgate.store import iso_utc

fleet = Blueprint("fleet", __name__, url_prefix="/api/v1")


@fleet.get("/health")
def health() -> Response:
    return jsonify(status="ok", version=__version__, **storage().health())


@fleet.get("/gateways")
def gateways() -> Response:
    return jsonify(gateways=[_summary(d) for d in storage().gateways()])


@fleet.get("/gateways/<serial>")
def gateway(serial: str) -> Response:
    d = storage().gateway(serial)
    if d is None:
        raise ApiError(404, f"no gateway {serial} on this hub")
    return jsonify(_summary(d))


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    """A storage summary with its times as RFC 3339."""
    out = dict(d)
    for key in ("created_at", "registered_at", "last_seen"):
        out[key] = iso_utc(out[key]) if out.get(key) else None
    if out.get("last_batch") and out["last_batch"].get("stored_at"):
        out["last_batch"]["stored_at"] = iso_utc(out["last_batch"]["stored_at"])
    return out
