"""``fieldgate status --prometheus``: the status in Prometheus' text exposition format.

The gateway publishes it through node_exporter's textfile collector: a systemd timer runs
``status --prometheus --output DIR/fieldgate.prom``, which writes the file atomically (a
temporary name, then a rename), so node_exporter never reads half a file
(docs/gateway-page.md lists every metric). Built from :func:`fieldgate.status.collect_status`,
so the text status, the JSON and the metrics cannot disagree.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from typing import Any

#: One metric family: name, type, help, and its samples as (labels, value).
Sample = tuple[dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _seconds(iso: str | None) -> float | None:
    if not iso:
        return None
    return dt.datetime.fromisoformat(iso).timestamp()


class _Families:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, kind: str, help_: str, samples: Iterable[Sample]) -> None:
        samples = list(samples)
        if not samples:
            return
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        sample_name = f"{name}_total" if kind == "counter" else name
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(
                f"{sample_name}{{{text}}} {_number(value)}"
                if text
                else f"{sample_name} {_number(value)}"
            )

    def gauge(self, name: str, help_: str, value: float | None) -> None:
        if value is not None:
            self.add(name, "gauge", help_, [({}, value)])


def _state(fact: dict[str, Any] | None, default: str | None = None) -> list[Sample]:
    value = fact["value"] if fact else default
    return [] if value is None else [({"state": str(value)}, 1)]


def render(s: dict[str, Any]) -> str:
    """The status dictionary of ``collect_status`` as Prometheus text."""
    f = _Families()
    f.add("fieldgate_info", "gauge", "The gateway's site serial.", [({"site": s["site"]}, 1)])
    st = s["store"]
    f.gauge(
        "fieldgate_store_exists",
        "1 when the store exists (a reading was received).",
        1 if st.get("exists") else 0,
    )
    d = s["disk"]
    f.gauge(
        "fieldgate_disk_used_ratio",
        "Use of the store's filesystem (0 to 1).",
        d["used_percent"] / 100,
    )
    f.gauge(
        "fieldgate_disk_stop_accepting_ratio",
        "Use of the store's filesystem at which intake stops (0 to 1).",
        d["stop_accepting_at_percent"] / 100,
    )
    if not st.get("exists"):
        return "\n".join(f.lines) + "\n"
    f.gauge("fieldgate_store_size_bytes", "Size of the store file.", st["size_bytes"])
    f.gauge("fieldgate_readings", "Readings in the store.", s["readings"]["total"])
    f.gauge(
        "fieldgate_backlog_readings",
        "Readings not yet cut into a batch.",
        s["readings"]["unbatched"],
    )
    f.gauge(
        "fieldgate_rejected_messages",
        "Messages kept in the rejected table.",
        s["rejected"]["total"],
    )
    b = s["batches"]
    f.add(
        "fieldgate_batches",
        "gauge",
        "Batch files by state.",
        [({"state": "pending"}, b["pending"]), ({"state": "uploaded"}, b["uploaded"])],
    )
    f.gauge(
        "fieldgate_batches_oldest_pending_age_seconds",
        "Age of the oldest batch waiting for upload.",
        b["oldest_pending_age_secs"],
    )
    f.add(
        "fieldgate_collector_state",
        "gauge",
        "The collector's last published state.",
        _state(s["collector"]["state"], "never_ran"),
    )
    hb = s["collector"]["heartbeat"]
    f.gauge(
        "fieldgate_collector_heartbeat_age_seconds",
        "Seconds since the collector last said it was alive.",
        hb and hb["age_secs"],
    )
    f.add(
        "fieldgate_export_state",
        "gauge",
        "The USB export's state (CONTRACT §7).",
        _state(s["export"]["state"], "normal_operation"),
    )
    u = s["upload"]
    f.add(
        "fieldgate_upload_mode",
        "gauge",
        "Upload mode (LIVE, TEST, PASS).",
        [({"mode": u["mode"]}, 1)],
    )
    ok = u["last_success"]
    f.gauge(
        "fieldgate_upload_last_success_timestamp_seconds",
        "When the hub last stored a batch (Unix time).",
        ok and _seconds(ok["updated"]),
    )
    f.gauge(
        "fieldgate_upload_last_success_age_seconds",
        "Seconds since the hub last stored a batch, when this file was written.",
        ok and ok["age_secs"],
    )
    err = u["last_error"]
    f.gauge(
        "fieldgate_upload_last_error_timestamp_seconds",
        "When an upload last failed (Unix time).",
        err and _seconds(err["updated"]),
    )
    for key, help_ in (
        ("messages", "Messages received on the input."),
        ("readings", "Readings stored from the input."),
        ("skipped", "Values skipped (not numbers) on the input."),
        ("rejected", "Messages of the input kept in rejected."),
        ("unstamped", "Messages that needed the broker's arrival stamp and had none."),
    ):
        f.add(
            f"fieldgate_input_{key}",
            "counter",
            help_,
            [({"topic": i["topic"], "format": i["format"]}, i[key]) for i in s["inputs"]],
        )
    f.add(
        "fieldgate_device_readings",
        "gauge",
        "Readings of the device in the store.",
        [({"device": x["device"]}, x["readings"]) for x in s["devices"]],
    )
    f.add(
        "fieldgate_device_last_reading_timestamp_seconds",
        "gauge",
        "Time of the device's latest reading (Unix time).",
        [({"device": x["device"]}, x["last_ts"] / 1000) for x in s["devices"]],
    )
    return "\n".join(f.lines) + "\n"
