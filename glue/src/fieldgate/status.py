"""``fieldgate status``: what an operator at the site needs to know, in one screen.

Everything comes from the store (counts, batches, and the facts daemons publish in the
``state`` table), from the filesystem (disk use) and from the running collector itself
(:mod:`fieldgate.live`), so status works while the daemons run and after they have
stopped. Status only reads: it writes nothing into or beside the store (not even SQLite's
``-wal``/``-shm``), so it also works on a full disk.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from fieldgate import live, membership, store
from fieldgate.config import Config
from fieldgate.fsutil import disk_usage_percent, free_bytes, human_bytes
from fieldgate.inputs import STATE_PREFIX, InputCounts
from fieldgate.modbus.report import modbus_status, render_modbus
from fieldgate.pull import pull_status, render_pull
from fieldgate.refusals import broker_refusals, render_refusals


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return store.iso_utc(ms)


def collect_status(cfg: Config) -> dict[str, Any]:
    """The status as a dictionary (what ``status --json`` prints)."""
    path = Path(cfg.store.path)
    result: dict[str, Any] = {"site": cfg.site.serial, "store": {"path": str(path)}}
    disk_dir = path.parent if path.parent.exists() else Path("/")
    result["disk"] = _disk(cfg, disk_dir)
    result["broker_refusals"] = broker_refusals(cfg.mqtt.broker_refusals_file)
    result["pull"] = pull_status(cfg.pull.result_file)
    if not path.exists() or path.stat().st_size == 0:  # (SQLite makes the file, then the schema)
        result["store"]["exists"] = False
        result["collector"] = _collector(path, None)
        return result
    # read-only, writing nothing beside the store (query_only; immutable when the WAL is
    # empty): status never takes a lock the collector would wait for, and works on a full disk
    extra = store.read_store(
        path, lambda conn: _from_store(conn, cfg), busy_timeout_ms=cfg.store.busy_timeout_ms
    )
    result["store"].update(extra.pop("store"))
    result.update(extra)
    result["collector"] = _collector(path, result["collector"])
    result["store"]["exists"] = True
    result["store"]["size_bytes"] = path.stat().st_size
    return result


def _disk(cfg: Config, disk_dir: Path) -> dict[str, Any]:
    used = disk_usage_percent(disk_dir)
    return {
        "path": str(disk_dir),
        "used_percent": round(used, 1),
        "stop_accepting_at_percent": cfg.disk.stop_accepting_at_percent,
        "free_bytes": free_bytes(disk_dir),
        "over_threshold": used >= cfg.disk.stop_accepting_at_percent,
    }


def _collector(path: Path, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The collector as it is now: its own answer when it runs (:mod:`fieldgate.live`),
    else what it last recorded in the store, with ``running`` false.

    Keys: ``state`` and ``heartbeat`` (facts: value, updated, age_secs), ``running``,
    ``pid`` (when running) and ``recorded_state`` (the store's ``collector.state``, which
    can lag: a full disk refuses the write, a killed collector leaves "running").
    """
    recorded = recorded or {"state": None, "heartbeat": None}
    out: dict[str, Any] = {**recorded, "recorded_state": recorded["state"]}
    answer = live.ask(path)
    out["running"] = answer is not None
    if answer is not None:
        now, since = answer["now"], answer["since"]
        out["pid"] = answer["pid"]
        out["state"] = {
            "value": answer["state"],
            "updated": _iso(since),
            "age_secs": round((now - since) / 1000, 1),
        }
        out["heartbeat"] = {"value": _iso(now), "updated": _iso(now), "age_secs": 0.0}
    return out


def _collector_text(c: dict[str, Any]) -> str:
    if c["running"] or (c["state"] and c["state"]["value"] == "stopped"):
        return _fact_text(c["state"])
    if c["state"] is None:
        return "not running (never ran)"
    return f"not running (last recorded: {_fact_text(c['state'])})"


def _disk_text(d: dict[str, Any]) -> str:
    text = (
        f"{d['used_percent']}% used of {d['path']} "
        f"(intake stops at {d['stop_accepting_at_percent']}%)"
    )
    if d["over_threshold"]:
        text += f": over the threshold, {human_bytes(d['free_bytes'])} free"
    return text


def _from_store(conn: sqlite3.Connection, cfg: Config) -> dict[str, Any]:
    now = store.now_ms()
    version = store.schema_version(conn)
    q = conn.execute
    counted = store_counts if version >= 3 else scan_counts
    readings, backlog, rejected, reasons, device_rows, batch_rows = counted(conn)
    devices = [
        {"device": d, "readings": n, "last_ts": ts, "last_reading": _iso(ts)}
        for d, n, ts in device_rows
    ]
    pending, oldest_pending = batch_rows.get("pending", (0, None))
    state = store.get_state(conn)

    def fact(key: str) -> dict[str, Any] | None:
        if key not in state:
            return None
        value, at = state[key]
        return {"value": value, "updated": _iso(at), "age_secs": round((now - at) / 1000, 1)}

    events = [
        {"at": _iso(at), "kind": kind, "message": msg}
        for at, kind, msg in q("SELECT at, kind, message FROM events ORDER BY id DESC LIMIT 5")
    ]
    return {
        "store": {
            "schema_version": version,
            "site_serial": store.get_meta(conn, "site_serial"),
        },
        "readings": {"total": readings, "unbatched": backlog},
        "rejected": {"total": rejected, "top_reasons": reasons},
        "devices": devices,
        "collector": {
            "state": fact("collector.state"),
            "heartbeat": fact("collector.heartbeat"),
        },
        "poller": {"state": fact("poller.state")},
        "modbus": modbus_status(cfg, state, fact),
        "inputs": _inputs(cfg, state),
        "batches": {
            "pending": pending,
            "uploaded": batch_rows.get("uploaded", (0, None))[0],
            "oldest_pending": _iso(oldest_pending),
            "oldest_pending_age_secs": (
                None if oldest_pending is None else round((now - oldest_pending) / 1000, 1)
            ),
        },
        "upload": {
            "mode": cfg.upload.mode,
            # the hub calls a gateway late after 3 intervals without a heartbeat
            "interval_secs": cfg.upload.interval_secs,
            "last_success": fact("upload.last_success"),
            "last_error": fact("upload.last_error"),
            "rejected_by_hub": fact("upload.rejected_by_hub"),
        },
        "export": {"state": fact("export.state"), "last_result": fact("export.last_result")},
        "power": {"last_event": fact("power.last_event")},
        "events": events,
    }


Counts = tuple[int, int, int, list[dict[str, Any]], list[Any], dict[str, tuple[int, int | None]]]
"""The store's figures: readings, unbatched readings, rejected messages, the top five
reasons (reason, count), each device's (device, readings, newest ts) and, per batch state
(pending, uploaded), (batches, oldest created_at)."""


def store_counts(conn: sqlite3.Connection) -> Counts:
    """The store's figures from the counters kept as rows are written and deleted
    (``device_counts``, ``counts``, ``rejected_reasons``: schema 3) and from index seeks:
    the same cost on a store of any size."""
    q = conn.execute
    counts = dict(q("SELECT name, n FROM counts").fetchall())
    reasons = [
        {"reason": r, "count": n}
        for r, n in q("SELECT reason, n FROM rejected_reasons ORDER BY n DESC, reason LIMIT 5")
    ]
    # each device's newest reading: a seek on the (device, ts, metric) unique index
    devices = q(
        "SELECT device, readings, (SELECT MAX(ts) FROM readings r WHERE r.device = c.device) "
        "FROM device_counts c WHERE readings > 0 ORDER BY device"
    ).fetchall()
    # batches (state, created_at) index: pending batches are few; uploaded ones are pruned
    # after store.retention_days
    batch_rows = {
        s: tuple(
            q("SELECT COUNT(*), MIN(created_at) FROM batches WHERE state = ?", (s,)).fetchone()
        )
        for s in ("pending", "uploaded")
    }
    readings = sum(n for _, n, _ in devices)
    return readings, counts["unbatched"], counts["rejected"], reasons, devices, batch_rows


def scan_counts(conn: sqlite3.Connection) -> Counts:
    """The same figures counted from the rows: a store of schema 2 or older, which status
    (read-only) does not migrate; the collector migrates it when it starts."""
    q = conn.execute
    readings = q("SELECT COUNT(*) FROM readings").fetchone()[0]
    backlog = membership.count_unbatched(conn)
    rejected = q("SELECT COUNT(*) FROM rejected").fetchone()[0]
    reasons = [
        {"reason": r, "count": n}
        for r, n in q(
            "SELECT reason, COUNT(*) AS n FROM rejected GROUP BY reason "
            "ORDER BY n DESC, reason LIMIT 5"
        )
    ]
    devices = q(
        "SELECT device, COUNT(*), MAX(ts) FROM readings GROUP BY device ORDER BY device"
    ).fetchall()
    batch_rows: dict[str, tuple[int, int | None]] = {"pending": (0, None), "uploaded": (0, None)}
    for s, n, oldest in q("SELECT state, COUNT(*), MIN(created_at) FROM batches GROUP BY state"):
        batch_rows[s] = (n, oldest)
    return readings, backlog, rejected, reasons, devices, batch_rows


def _inputs(cfg: Config, state: dict[str, tuple[str, int]]) -> list[dict[str, Any]]:
    """Per input (the native topic, then ``mqtt.inputs``): what the collector counted."""
    rows = []
    configured = [(cfg.mqtt.native_topic, "fieldgate")]
    configured += [(i.topic, i.format) for i in cfg.mqtt.inputs]
    for topic, fmt in configured:
        got = state.get(STATE_PREFIX + topic)
        counts = InputCounts.from_json(got[0]) if got else InputCounts()
        rows.append({"topic": topic, "format": fmt, **counts.__dict__})
    return rows


def _inputs_text(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["inputs"]
    width = max(len(r["topic"]) for r in rows)
    fwidth = max(len(r["format"]) for r in rows)
    for r in rows:
        unstamped = f", {r['unstamped']} unstamped" if r["unstamped"] else ""
        lines.append(
            f"  {r['topic']:<{width}}  {r['format']:<{fwidth}}  {r['messages']} messages, "
            f"{r['readings']} readings, {r['skipped']} skipped values, "
            f"{r['rejected']} rejected{unstamped}"
        )
    unstamped = sum(r["unstamped"] for r in rows)
    if unstamped:
        lines.append(
            f"arrival stamps  missing on {unstamped} messages that needed one: the broker does "
            "not load the stamp plugin (see 'fieldgate broker-conf'); their readings carry the "
            "collector's receive time"
        )
    return lines


def _fact_text(f: dict[str, Any] | None, default: str = "unknown") -> str:
    if not f:
        return default
    return f"{f['value']} (since {f['updated']}, {f['age_secs']:.0f} s ago)"


def render_text(s: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect_status`."""
    lines = [f"site            {s['site']}"]
    st = s["store"]
    d = s["disk"]
    if not st.get("exists"):
        lines.append(f"store           {st['path']} (not created yet: no reading received)")
        lines.append(f"disk            {_disk_text(d)}")
        lines.append(f"collector       {_collector_text(s['collector'])}")
        lines.extend(render_refusals(s.get("broker_refusals")))
        lines.extend(render_pull(s.get("pull")))
        return "\n".join(lines) + "\n"
    lines.append(
        f"store           {st['path']} ({st['size_bytes']} bytes, schema {st['schema_version']})"
    )
    lines.append(
        f"readings        {s['readings']['total']} stored, "
        f"{s['readings']['unbatched']} not yet batched"
    )
    lines.append(f"rejected        {s['rejected']['total']}")
    for r in s["rejected"]["top_reasons"]:
        lines.append(f"  {r['count']:>8}  {r['reason']}")
    lines.append(f"disk            {_disk_text(d)}")
    lines.append(f"collector       {_collector_text(s['collector'])}")
    if s["poller"]["state"]:
        lines.append(f"poller          {_fact_text(s['poller']['state'])}")
    lines.extend(render_modbus(s.get("modbus")))
    lines.extend(_inputs_text(s["inputs"]))
    lines.extend(render_refusals(s.get("broker_refusals")))
    b = s["batches"]
    age = "" if b["oldest_pending"] is None else f", oldest from {b['oldest_pending']}"
    lines.append(f"batches         {b['pending']} pending{age}, {b['uploaded']} uploaded")
    u = s["upload"]
    lines.append(f"upload mode     {u['mode']}")
    lines.append(f"last upload     {_fact_text(u['last_success'], 'never')}")
    if u["last_error"]:
        lines.append(f"last error      {_fact_text(u['last_error'])}")
    if u["rejected_by_hub"]:
        lines.append(f"hub refusals    {u['rejected_by_hub']['value']}")
    lines.append(f"usb export      {_fact_text(s['export']['state'], 'normal_operation')}")
    if s["export"]["last_result"]:
        lines.append(f"last export     {_fact_text(s['export']['last_result'])}")
    lines.extend(render_pull(s.get("pull")))
    if s["power"]["last_event"]:
        lines.append(f"power           {_fact_text(s['power']['last_event'])}")
    if s["devices"]:
        lines.append("devices")
        width = max(len(x["device"]) for x in s["devices"])
        for x in s["devices"]:
            lines.append(
                f"  {x['device']:<{width}}  {x['readings']:>10} readings, last {x['last_reading']}"
            )
    if s["events"]:
        lines.append("recent events")
        for e in s["events"]:
            lines.append(f"  {e['at']}  {e['kind']}: {e['message']}")
    return "\n".join(lines) + "\n"
