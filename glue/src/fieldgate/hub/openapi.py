"""The hub API described as an OpenAPI 3 document, served at ``GET /api/v1/openapi.json``.

Written here, next to the limits it quotes, and kept true by the tests: every route of the
application is in it and every path in it is a route, real answers are validated against
its schemas, and schemathesis fuzzes the hub from it.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from fieldgate import __version__
from fieldgate.batchfile import MAX_ROWS
from fieldgate.hub.auth import ADDRESS_LIMIT, USER_LIMIT, WINDOW_MS, require_user
from fieldgate.hub.auth import MAX_NAME as MAX_USER_NAME
from fieldgate.hub.query import MAX_BUCKETS, MAX_EVERY_SECS, MAX_NAME
from fieldgate.hub.storage import LAST_BATCH_FIELDS
from fieldgate.hub.uploads import MAX_HEARTBEAT_BYTES
from fieldgate.names import PATTERNS

docs = require_user(Blueprint("docs", __name__, url_prefix="/api/v1"))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_NULLABLE_TIME = {"type": "string", "format": "date-time", "nullable": True}
_TS = {"type": "integer", "minimum": 0, "description": "UTC epoch milliseconds"}
_NAME = {"type": "string", "pattern": PATTERNS["name"]}
_TIME_PARAM = {
    "type": "string",
    # epoch ms below 2**53, or RFC 3339 from 1970 on (a date that does not exist, such as
    # February 30, is a 400 the pattern cannot express)
    "pattern": r"^([0-9]{1,15}|(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]"
    r"|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-]"
    r"([01][0-9]|2[0-3]):[0-5][0-9]))$",
    "description": "epoch milliseconds or RFC 3339 (2026-01-01T00:00:00Z)",
}
_USER_ERRORS = {
    "401": _error("no user, or wrong credentials (WWW-Authenticate: Basic)"),
    "429": _error(
        f"too many failed logins: {USER_LIMIT} per user name or {ADDRESS_LIMIT} per client "
        f"address within {WINDOW_MS // 60000} minutes; Retry-After says when to try again"
    ),
}
_USER = [{"basicAuth": []}, {"sessionCookie": []}]


def _query(
    name: str, schema: dict[str, Any], description: str, *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


_FORMAT = _query("format", {"type": "string", "enum": ["json", "csv"]}, "json (default) or csv")
_SERIAL_Q = _query("serial", {"type": "string", "minLength": 1}, "the gateway", required=True)


def document() -> dict[str, Any]:
    """The OpenAPI document of this hub."""
    raw_or_buckets = {
        "anyOf": [
            {
                "type": "object",
                "required": ["readings"],
                "properties": {"readings": {"type": "array", "items": _ref("Reading")}},
            },
            {
                "type": "object",
                "required": ["readings"],
                "properties": {"readings": {"type": "array", "items": _ref("Bucket")}},
            },
        ]
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "fieldgate hub",
            "version": __version__,
            "description": "Gateways upload batches of readings (gateway keys); people read "
            "them back (users limited to their domains). docs/hub.md tells the whole story.",
        },
        "paths": {
            "/api/v1/health": {
                "get": {
                    "summary": "The hub and its database answer (no credentials)",
                    "security": [],
                    "responses": {"200": _json(_ref("Health"), "the hub is up")},
                }
            },
            "/api/v1/register": {
                "post": {
                    "summary": "Redeem a one-time PIN for a gateway key",
                    "security": [],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["pin", "serial"],
                                    "properties": {
                                        "pin": {"type": "string"},
                                        "serial": _NAME,
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _json(
                            {
                                "type": "object",
                                "required": ["gateway_key"],
                                "properties": {"gateway_key": {"type": "string"}},
                            },
                            "the gateway's new key (older keys revoked)",
                        ),
                        "400": _error("not a JSON object with a pin and a valid serial"),
                        "403": _error("wrong, used or expired PIN"),
                    },
                }
            },
            "/api/v1/batches": {
                "post": {
                    "summary": "Announce a batch: an upload URL, or 'stored' if it is known",
                    "security": [{"gatewayKey": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Manifest")}},
                    },
                    "responses": {
                        "200": _json(_ref("Stored"), "the batch is stored already"),
                        "201": _json(
                            {
                                "type": "object",
                                "required": ["upload_url", "expires_at"],
                                "properties": {
                                    "upload_url": {"type": "string"},
                                    "expires_at": {"type": "string", "format": "date-time"},
                                },
                            },
                            "PUT the zip to upload_url before expires_at",
                        ),
                        "400": _error("the body is not a JSON object"),
                        "401": _error("missing, unknown or revoked gateway key"),
                        "403": _error("the key belongs to another gateway"),
                        "409": _error("the same batch id is stored with other content"),
                        "422": _error("a manifest field is invalid"),
                    },
                }
            },
            "/api/v1/uploads/{token}": {
                "put": {
                    "summary": "Upload a batch zip (readings.csv and manifest.yaml)",
                    "security": [],
                    "description": "The token of the URL is the credential.",
                    "parameters": [
                        {
                            "name": "token",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/zip": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    "responses": {
                        "200": _json(_ref("Stored"), "stored already"),
                        "201": _json(
                            {
                                "type": "object",
                                "required": ["state", "rows", "new_rows"],
                                "properties": {
                                    "state": {"type": "string", "enum": ["stored"]},
                                    "rows": {"type": "integer"},
                                    "new_rows": {"type": "integer"},
                                },
                            },
                            "stored: the batch's rows and how many were new",
                        ),
                        "400": _error("not a zip, or the body was cut off"),
                        "403": _error("unknown or expired upload URL"),
                        "409": _error("checksum mismatch"),
                        "413": _error("larger than the hub accepts"),
                        "422": _error("zip members, manifest or readings.csv not acceptable"),
                    },
                }
            },
            "/api/v1/heartbeat": {
                "post": {
                    "summary": "A gateway reports its status (every upload interval)",
                    "security": [{"gatewayKey": []}],
                    "description": "The body is the gateway's `fieldgate status --json`; "
                    "`upload.interval_secs` in it tells the hub when the gateway is late "
                    "(no contact for 3 intervals).",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "responses": {
                        "204": {"description": "kept as the gateway's last status"},
                        "400": _error("the body is not a JSON object"),
                        "401": _error("missing, unknown or revoked gateway key"),
                        "413": _error(f"larger than {MAX_HEARTBEAT_BYTES} bytes"),
                    },
                }
            },
            "/api/v1/gateways": {
                "get": {
                    "summary": "The gateways of the caller's domains",
                    "security": _USER,
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["gateways"],
                                "properties": {
                                    "gateways": {"type": "array", "items": _ref("Gateway")}
                                },
                            },
                            "ordered by serial",
                        ),
                        **_USER_ERRORS,
                    },
                }
            },
            "/api/v1/gateways/{serial}": {
                "get": {
                    "summary": "One gateway",
                    "security": _USER,
                    "parameters": [
                        {
                            "name": "serial",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json(_ref("Gateway"), "the gateway"),
                        "404": _error("no such gateway in the caller's domains"),
                        **_USER_ERRORS,
                    },
                }
            },
            "/api/v1/readings": {
                "get": {
                    "summary": "Readings of one device and metric: raw (streamed), or "
                    "statistics per time bucket with every=",
                    "security": _USER,
                    "parameters": [
                        _SERIAL_Q,
                        _query(
                            "device",
                            {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                            "the device",
                            required=True,
                        ),
                        _query(
                            "metric",
                            {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                            "the metric",
                            required=True,
                        ),
                        _query("from", _TIME_PARAM, "from this time on (inclusive; default: all)"),
                        _query("to", _TIME_PARAM, "before this time (exclusive; default: all)"),
                        _query(
                            "every",
                            {"type": "integer", "minimum": 1, "maximum": MAX_EVERY_SECS},
                            "bucket width in seconds: one row per bucket holding readings, "
                            f"buckets counted from 'from' (or the epoch); at most {MAX_BUCKETS} "
                            "buckets per request",
                        ),
                        _FORMAT,
                    ],
                    "responses": {
                        "200": {
                            "description": "JSON, or CSV with a header line (ts,value or "
                            "ts,min,max,mean,count)",
                            "content": {
                                "application/json": {"schema": raw_or_buckets},
                                "text/csv": {"schema": {"type": "string"}},
                            },
                        },
                        "400": _error("a parameter is missing or wrong (the message names it)"),
                        "404": _error("no such gateway in the caller's domains, or no such series"),
                        **_USER_ERRORS,
                    },
                }
            },
            "/api/v1/extent": {
                "get": {
                    "summary": "First and last ts and the count per device and metric",
                    "security": _USER,
                    "parameters": [
                        _SERIAL_Q,
                        _query(
                            "device",
                            {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                            "only this device",
                        ),
                        _FORMAT,
                    ],
                    "responses": {
                        "200": {
                            "description": "JSON, or CSV device,metric,first_ts,last_ts,count",
                            "content": {
                                "application/json": {"schema": _ref("Extent")},
                                "text/csv": {"schema": {"type": "string"}},
                            },
                        },
                        "400": _error("a parameter is missing or wrong"),
                        "404": _error("no such gateway in the caller's domains, or no such device"),
                        **_USER_ERRORS,
                    },
                }
            },
            "/api/v1/login": {
                "post": {
                    "summary": "Start a session (cookie) instead of sending credentials each time",
                    "security": [],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": _ref("Login")},
                            "application/x-www-form-urlencoded": {"schema": _ref("Login")},
                        },
                    },
                    "responses": {
                        "200": _json(_ref("Me"), "logged in; the session cookie is set"),
                        "400": _error("no name or password"),
                        **_USER_ERRORS,
                    },
                }
            },
            "/api/v1/logout": {
                "post": {
                    "summary": "End this client's session",
                    "security": [],
                    "responses": {"204": {"description": "the session cookie is cleared"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "The caller's gateways and the hub's ingest in Prometheus' text "
                    "format (docs/pages.md)",
                    "security": _USER,
                    "responses": {
                        "200": {
                            "description": "Prometheus text format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_USER_ERRORS,
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": _USER,
                    "responses": {
                        "200": {"description": "OpenAPI 3", "content": {"application/json": {}}},
                        **_USER_ERRORS,
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "basicAuth": {"type": "http", "scheme": "basic"},
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "fieldgate_session"},
                "gatewayKey": {"type": "http", "scheme": "bearer"},
            },
            "schemas": _SCHEMAS,
        },
    }


_BATCH = {
    "type": "object",
    "required": list(LAST_BATCH_FIELDS),
    "properties": {
        "batch_id": {"type": "string"},
        "rows": {"type": "integer"},
        "new_rows": {"type": "integer"},
        "first_ts": {"type": "integer", "nullable": True},
        "last_ts": {"type": "integer", "nullable": True},
        "mode": {"type": "string", "nullable": True},
        "test": {"type": "boolean"},
        "stored_at": _NULLABLE_TIME,
    },
    "nullable": True,
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "one sentence"}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "version", "database", "gateways"],
        "properties": {
            "status": {"type": "string", "enum": ["ok"]},
            "version": {"type": "string"},
            "database": {"type": "string"},
            "gateways": {"type": "integer"},
        },
    },
    "Stored": {
        "type": "object",
        "required": ["state"],
        "properties": {"state": {"type": "string", "enum": ["stored"]}},
    },
    "Manifest": {
        "type": "object",
        "required": ["batch_id", "serial", "rows", "sha256", "first_ts", "last_ts", "mode", "type"],
        "properties": {
            "batch_id": {"type": "string", "pattern": PATTERNS["batch_id"]},
            "serial": _NAME,
            "rows": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "first_ts": {"type": "integer", "nullable": True},
            "last_ts": {"type": "integer", "nullable": True},
            "mode": {"type": "string", "enum": ["LIVE", "TEST"]},
            "type": _NAME,
        },
    },
    "Gateway": {
        "type": "object",
        "required": [
            "serial",
            "domain",
            "created_at",
            "registered_at",
            "last_seen",
            "last_heartbeat",
            "rows",
            "test_rows",
            "batches",
            "status",
            "last_batch",
        ],
        "properties": {
            "serial": {"type": "string"},
            "domain": {"type": "string"},
            "created_at": _NULLABLE_TIME,
            "registered_at": _NULLABLE_TIME,
            "last_seen": _NULLABLE_TIME,
            "last_heartbeat": _NULLABLE_TIME,
            "rows": {"type": "integer", "description": "readings held"},
            "test_rows": {"type": "integer", "description": "of them sent in TEST mode"},
            "batches": {"type": "integer"},
            "status": {
                "type": "object",
                "nullable": True,
                "description": "the last status the gateway reported with its heartbeat",
            },
            "last_batch": _BATCH,
        },
    },
    "Reading": {
        "type": "object",
        "required": ["ts", "value"],
        "properties": {"ts": _TS, "value": {"type": "number"}},
        "additionalProperties": False,
    },
    "Bucket": {
        "type": "object",
        "required": ["ts", "min", "max", "mean", "count"],
        "properties": {
            "ts": {**_TS, "description": "the bucket's start, UTC epoch milliseconds"},
            "min": {"type": "number"},
            "max": {"type": "number"},
            "mean": {"type": "number"},
            "count": {"type": "integer", "minimum": 1},
        },
        "additionalProperties": False,
    },
    "Extent": {
        "type": "object",
        "required": ["serial", "series"],
        "properties": {
            "serial": {"type": "string"},
            "series": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["device", "metric", "first_ts", "last_ts", "count"],
                    "properties": {
                        "device": {"type": "string"},
                        "metric": {"type": "string"},
                        "first_ts": _TS,
                        "last_ts": _TS,
                        "count": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
    },
    "Login": {
        "type": "object",
        "required": ["name", "password"],
        "properties": {
            "name": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_USER_NAME,
                "pattern": "^[^\\x00]*$",
            },
            "password": {"type": "string"},
        },
    },
    "Me": {
        "type": "object",
        "required": ["name", "admin", "domains"],
        "properties": {
            "name": {"type": "string"},
            "admin": {"type": "boolean"},
            "domains": {"type": "array", "items": {"type": "string"}},
        },
    },
}


@docs.get("/openapi.json")
def openapi() -> Response:
    return jsonify(document())
