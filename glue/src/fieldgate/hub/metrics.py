"""``GET /metrics``: the hub and its gateways in Prometheus' text format (docs/pages.md).

It needs a user like the read API (HTTP Basic: Prometheus' ``basic_auth``), and shows the
gateways of that user's domains (an admin: all of them): the figures are the gateways'
and their readings' and stay behind the same door. Everything is read from the database
at scrape time, so every worker and every hub process sharing the database answers alike.

Per gateway (labels ``serial``, ``domain``): seconds since the last contact and the last
heartbeat, whether it is late or silent, the upload interval it reported, its backlog,
pending batches, rejected readings and disk use (from its last heartbeat), the readings
the hub holds of it, and the batches it stored (a counter). Fleet-wide: gateways per
state, batches stored (a counter) and readings held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flask import Blueprint, Response

from fieldgate.hub.auth import caller, require_user
from fieldgate.hub.overview import STATES, GatewayView, view
from fieldgate.hub.web import storage
from fieldgate.store import now_ms

metrics = require_user(Blueprint("metrics", __name__))

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: name, type, help, the value of a gateway (None: left out)
PER_GATEWAY: tuple[tuple[str, str, str, Callable[[GatewayView], float | None]], ...] = (
    (
        "fieldgate_hub_gateway_last_contact_age_seconds",
        "gauge",
        "Seconds since the gateway's last heartbeat or batch.",
        lambda v: v.contact_age_secs,
    ),
    (
        "fieldgate_hub_gateway_last_heartbeat_age_seconds",
        "gauge",
        "Seconds since the gateway's last heartbeat.",
        lambda v: v.heartbeat_age_secs,
    ),
    (
        "fieldgate_hub_gateway_late",
        "gauge",
        "1 when the gateway has not been heard from for 3 upload intervals (or 24 h).",
        lambda v: 1.0 if v.state in ("late", "silent") else 0.0,
    ),
    (
        "fieldgate_hub_gateway_silent",
        "gauge",
        "1 when the gateway has not been heard from for 24 h.",
        lambda v: 1.0 if v.state == "silent" else 0.0,
    ),
    (
        "fieldgate_hub_gateway_upload_interval_seconds",
        "gauge",
        "The upload (and heartbeat) interval the gateway reported.",
        lambda v: v.interval_secs,
    ),
    (
        "fieldgate_hub_gateway_backlog_readings",
        "gauge",
        "Readings at the gateway not yet in a batch (its last heartbeat).",
        lambda v: v.backlog,
    ),
    (
        "fieldgate_hub_gateway_pending_batches",
        "gauge",
        "Batches at the gateway waiting to be uploaded (its last heartbeat).",
        lambda v: v.pending_batches,
    ),
    (
        "fieldgate_hub_gateway_rejected_readings",
        "gauge",
        "Readings the gateway's collector rejected (its last heartbeat).",
        lambda v: v.rejected,
    ),
    (
        "fieldgate_hub_gateway_disk_used_percent",
        "gauge",
        "Disk use of the gateway's store (its last heartbeat).",
        lambda v: v.disk_percent,
    ),
    (
        "fieldgate_hub_gateway_readings",
        "gauge",
        "Readings of the gateway the hub holds (retention lowers it).",
        lambda v: float(v.rows),
    ),
    (
        "fieldgate_hub_gateway_batches_stored_total",
        "counter",
        "Batches of the gateway the hub stored.",
        lambda v: float(v.batches),
    ),
)


def label(text: str) -> str:
    """A label value escaped for the text format."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(v: float) -> str:
    return repr(float(v))


def render(views: Iterable[GatewayView]) -> str:
    """The text exposition of these gateways."""
    views = list(views)
    out: list[str] = []
    for name, kind, text, get in PER_GATEWAY:
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for v in views:
            value = get(v)
            if value is not None:
                labels = f'serial="{label(v.serial)}",domain="{label(v.domain)}"'
                out.append(f"{name}{{{labels}}} {number(value)}")
    out += [
        "# HELP fieldgate_hub_gateways Gateways the caller may see, by state.",
        "# TYPE fieldgate_hub_gateways gauge",
    ]
    for state in STATES:
        n = sum(1 for v in views if v.state == state)
        out.append(f'fieldgate_hub_gateways{{state="{state}"}} {n}')
    out += [
        "# HELP fieldgate_hub_batches_stored_total Batches the hub stored (these gateways).",
        "# TYPE fieldgate_hub_batches_stored_total counter",
        f"fieldgate_hub_batches_stored_total {sum(v.batches for v in views)}",
        "# HELP fieldgate_hub_readings Readings the hub holds (these gateways).",
        "# TYPE fieldgate_hub_readings gauge",
        f"fieldgate_hub_readings {sum(v.rows for v in views)}",
    ]
    return "\n".join(out) + "\n"


@metrics.get("/metrics")
def scrape() -> Response:
    now = now_ms()
    views = [view(d, now) for d in storage().gateways(caller().visible, brief=True)]
    return Response(render(views), content_type=CONTENT_TYPE)
