"""``GET /api/v1/health`` (open) and the gateway summaries a user may see
(``/api/v1/gateways[/<serial>]``, docs/contract.md §11)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from fieldgate import __version__
from fieldgate.hub.auth import caller, require_user
from fieldgate.hub.web import ApiError, storage
from fieldgate.store import iso_utc

health_bp = Blueprint("health", __name__, url_prefix="/api/v1")
fleet = require_user(Blueprint("fleet", __name__, url_prefix="/api/v1"))


@health_bp.get("/health")
def health() -> Response:
    return jsonify(status="ok", version=__version__, **storage().health())


@fleet.get("/gateways")
def gateways() -> Response:
    return jsonify(gateways=[summary(d) for d in storage().gateways(caller().visible)])


@fleet.get("/gateways/<serial>")
def gateway(serial: str) -> Response:
    return jsonify(summary(visible_gateway(serial)))


def visible_gateway(serial: str) -> dict[str, Any]:
    """A gateway the caller may see, else 404 (the same answer as for one that does not
    exist, so a user cannot learn which serials other domains hold)."""
    d = storage().gateway(serial, caller().visible)
    if d is None:
        raise ApiError(404, f"no gateway {serial} on this hub")
    return d


def summary(d: dict[str, Any]) -> dict[str, Any]:
    """A storage summary with its times as RFC 3339."""
    out = dict(d)
    for key in ("created_at", "registered_at", "last_seen", "last_heartbeat"):
        out[key] = iso_utc(out[key]) if out.get(key) else None
    if out.get("last_batch") and out["last_batch"].get("stored_at"):
        out["last_batch"] = {
            **out["last_batch"],
            "stored_at": iso_utc(out["last_batch"]["stored_at"]),
        }
    return out
