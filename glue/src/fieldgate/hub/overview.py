"""What the fleet page and ``/metrics`` say about a gateway: its state and the figures of
its last heartbeat (docs/pages.md).

A gateway's last contact is its last heartbeat or batch (``last_seen``: both set it). It is

- ``silent`` after :data:`SILENT_MS` without contact,
- ``late`` after :data:`LATE_INTERVALS` upload intervals without contact (the interval is
  the ``upload.interval_secs`` of its last status, :data:`DEFAULT_INTERVAL_SECS` when it
  never sent one),
- ``never`` when it has sent neither a heartbeat nor a batch since it was added or
  registered,
- ``attention`` when it answers but something needs a look: an upload error newer than
  the last success, readings the hub refused, the collector not running, an export error,
  the disk at :data:`DISK_WARN_PERCENT` or more, its last pull run (``ansible-pull``,
  docs/pull-mode.md) failed;
- ``ok`` otherwise.

The status is whatever the gateway sent: every field is read defensively (a missing or
ill-typed one is shown as unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Upload intervals without contact after which a gateway is late.
LATE_INTERVALS = 3
#: Without contact this long, a gateway is silent.
SILENT_MS = 24 * 3600 * 1000
#: The gateway's default ``upload.interval_secs`` (for a gateway that never reported one).
DEFAULT_INTERVAL_SECS = 300.0
#: Disk use (percent) from which a gateway needs attention.
DISK_WARN_PERCENT = 90.0
#: States, problems first (the fleet page's default order).
STATES = ("silent", "late", "never", "attention", "ok")


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else None


@dataclass(frozen=True)
class GatewayView:
    """One gateway as the fleet page shows it."""

    serial: str
    domain: str
    state: str
    last_contact: int | None  # epoch ms
    last_heartbeat: int | None
    contact_age_secs: float | None
    heartbeat_age_secs: float | None
    interval_secs: float
    backlog: float | None  # readings not yet batched, at the gateway
    pending_batches: float | None
    rejected: float | None  # readings the gateway's collector rejected
    refused_by_hub: float | None
    disk_percent: float | None
    collector: str | None
    export: str | None
    last_error: str | None
    pull: str | None  # "ok" | "failed": its last pull run; None: converged by push
    pull_changed: float | None
    pull_age_secs: float | None
    rows: int  # readings the hub holds
    batches: int  # batches the hub stored

    @property
    def rank(self) -> int:
        return STATES.index(self.state)


def brief(status: Any) -> dict[str, Any]:
    """The figures of a status the fleet shows (kept beside it by the heartbeat, so that the
    fleet page and /metrics read a few hundred bytes per gateway, not the whole status)."""
    refused = _get(status, "upload", "rejected_by_hub", "value")
    if isinstance(refused, str):
        refused = float(refused) if refused.isdigit() else None
    return {
        "interval_secs": _number(_get(status, "upload", "interval_secs")),
        "backlog": _number(_get(status, "readings", "unbatched")),
        "pending_batches": _number(_get(status, "batches", "pending")),
        "rejected": _number(_get(status, "rejected", "total")),
        "refused_by_hub": _number(refused),
        "disk_percent": _number(_get(status, "disk", "used_percent")),
        "collector": _text(_get(status, "collector", "state", "value")),
        "export": _text(_get(status, "export", "state", "value")),
        "last_error": _text(_get(status, "upload", "last_error", "value")),
        "error_at": _text(_get(status, "upload", "last_error", "updated")) or "",
        "success_at": _text(_get(status, "upload", "last_success", "updated")) or "",
        "pull": _text(_get(status, "pull", "result")),
        "pull_changed": _number(_get(status, "pull", "changed")),
        "pull_age_secs": _number(_get(status, "pull", "age_secs")),
    }


def view(d: dict[str, Any], now: int) -> GatewayView:
    """The view of a gateway summary (:meth:`HubStorage.gateways`, with its ``brief`` or
    its whole ``status``) at ``now`` (epoch ms)."""
    b = d["brief"] if isinstance(d.get("brief"), dict) else brief(d.get("status"))
    interval = _number(b.get("interval_secs"))
    interval = interval if interval and interval > 0 else DEFAULT_INTERVAL_SECS
    contact = d.get("last_seen")
    beat = d.get("last_heartbeat")
    error, collector, disk = b.get("last_error"), b.get("collector"), b.get("disk_percent")
    if contact is None or (beat is None and not d.get("batches")):
        state = "never"
    elif now - contact >= SILENT_MS:
        state = "silent"
    elif now - contact >= LATE_INTERVALS * interval * 1000:
        state = "late"
    elif (
        (error and (b.get("error_at") or "") >= (b.get("success_at") or ""))
        or (b.get("refused_by_hub") or 0) > 0
        or (collector is not None and collector != "running")
        or b.get("export") == "error"
        or (disk is not None and disk >= DISK_WARN_PERCENT)
        or b.get("pull") == "failed"
    ):
        state = "attention"
    else:
        state = "ok"
    return GatewayView(
        serial=d["serial"],
        domain=d["domain"],
        state=state,
        last_contact=contact,
        last_heartbeat=beat,
        contact_age_secs=None if contact is None else max(0.0, (now - contact) / 1000),
        heartbeat_age_secs=None if beat is None else max(0.0, (now - beat) / 1000),
        interval_secs=interval,
        backlog=_number(b.get("backlog")),
        pending_batches=_number(b.get("pending_batches")),
        rejected=_number(b.get("rejected")),
        refused_by_hub=_number(b.get("refused_by_hub")),
        disk_percent=disk if isinstance(disk, int | float) else None,
        collector=collector if isinstance(collector, str) else None,
        export=b.get("export") if isinstance(b.get("export"), str) else None,
        last_error=error if isinstance(error, str) else None,
        pull=b.get("pull") if b.get("pull") in ("ok", "failed") else None,
        pull_changed=_number(b.get("pull_changed")),
        # its age when the heartbeat left the gateway, plus the heartbeat's own age
        pull_age_secs=None
        if _number(b.get("pull_age_secs")) is None or beat is None
        else _number(b.get("pull_age_secs")) + max(0.0, (now - beat) / 1000),
        rows=int(d.get("rows") or 0),
        batches=int(d.get("batches") or 0),
    )
