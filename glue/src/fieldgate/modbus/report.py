"""What ``fieldgate status`` shows of the Modbus devices, from the facts the poller publishes.

The poller keeps one summary (``poller.modbus.state``) and one JSON fact per device
(``poller.modbus.device.<device>``) in the store's ``state`` table; status reads them for
the devices configured now, so a device removed from the configuration is not shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fieldgate import store
from fieldgate.config import Config

STATE_KEY = "poller.modbus.state"


def device_key(device: str) -> str:
    """The ``state`` key of one device's facts."""
    return f"poller.modbus.device.{device}"


def _iso(ms: Any) -> str | None:
    return store.iso_utc(ms) if isinstance(ms, int) else None


def modbus_status(
    cfg: Config,
    state: dict[str, tuple[str, int]],
    fact: Callable[[str], dict[str, Any] | None],
) -> dict[str, Any] | None:
    """The ``modbus`` part of ``status --json``; None when no Modbus device is configured."""
    if not cfg.poll.modbus:
        return None
    devices = []
    for dev in cfg.poll.modbus:
        name = cfg.devices.resolve(dev.device) or dev.device
        entry: dict[str, Any] = {"device": name, "where": f"{dev.bus} unit {dev.unit}"}
        raw = state.get(device_key(name))
        facts: dict[str, Any] = {}
        if raw is not None:
            try:
                loaded = json.loads(raw[0])
            except ValueError:
                loaded = None
            facts = loaded if isinstance(loaded, dict) else {}
            entry["updated"] = _iso(raw[1])
        polls = facts.get("polls", 0)
        if not polls:
            entry["state"] = "not polled yet"
        else:
            entry["state"] = "failing" if facts.get("consecutive_failures") else "ok"
        for key in (
            "polls",
            "failures",
            "consecutive_failures",
            "requests",
            "readings",
            "rejected_values",
            "late",
        ):
            entry[key] = facts.get(key, 0)
        entry["failures_by_kind"] = facts.get("failures_by_kind", {})
        entry["last_error"] = facts.get("last_error")
        for key in ("since", "last_poll", "last_success", "last_error_at", "next_attempt"):
            entry[key] = _iso(facts.get(key))
        devices.append(entry)
    return {"state": fact(STATE_KEY), "devices": devices}


def render_modbus(m: dict[str, Any] | None) -> list[str]:
    """The lines ``fieldgate status`` prints for Modbus (none without Modbus devices)."""
    if not m:
        return []
    state = m["state"]
    head = (
        "never ran"
        if not state
        else f"{state['value']} (since {state['updated']}, {state['age_secs']:.0f} s ago)"
    )
    lines = [f"modbus          {head}"]
    width = max(len(d["device"]) for d in m["devices"])
    for d in m["devices"]:
        shown = "FAILING" if d["state"] == "failing" else d["state"]
        lines.append(f"  {d['device']:<{width}}  {shown:<7}  {d['where']}")
        if d["polls"]:
            kinds = ", ".join(f"{k} {n}" for k, n in d["failures_by_kind"].items())
            text = (
                f"    {d['polls']} polls, {d['failures']} failed"
                f"{f' ({kinds})' if kinds else ''}, {d['requests']} requests, "
                f"{d['readings']} readings"
            )
            if d["rejected_values"]:
                text += f", {d['rejected_values']} values rejected"
            if d["late"]:
                text += f", {d['late']} polls late"
            lines.append(f"{text} since {d['since']}")
        if d["polls"] or d["last_success"]:
            lines.append(f"    last success {d['last_success'] or 'never'}")
        if d["last_error"]:
            lines.append(f"    last error   {d['last_error_at']}: {d['last_error']}")
        if d["state"] == "failing" and d["next_attempt"]:
            lines.append(f"    next try     {d['next_attempt']}")
    return lines
