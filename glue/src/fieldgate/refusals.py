"""What the gateway's broker refused: publishes its ACL denied, counted per account, and
connections it dropped for protocol errors, counted per source.

Mosquitto acknowledges a PUBLISH its ACL denies (a topic the account may not use, an extra
topic level) and drops it, naming it only in its debug log. The fieldgate broker plugin counts
them when loaded with ``plugin_opt_refusals_file`` (``fieldgate broker-conf --refusals-file``)
and writes the counts since the broker started as JSON, at most once a second, only after a
change; ``mqtt.broker_refusals_file`` names that file for ``fieldgate status``. Reading it is
cheap and bounded: one small file (the plugin keeps at most 256 accounts), refused beyond
:data:`MAX_BYTES`.

Protocol errors (a malformed packet, a second CONNECT, an oversize packet) are counted when
the plugin also reads the broker's log (``plugin_opt_broker_log``, ``fieldgate broker-conf
--broker-log``): Mosquitto 2.0.11 names the reason only there (docs/broker-security.md).
"""

from __future__ import annotations

from typing import Any

from fieldgate import store
from fieldgate.fsutil import load_small_json

#: The plugin writes at most 256 accounts of ~400 bytes each, and 256 sources of ~500.
MAX_BYTES = 512 * 1024


def broker_refusals(path: str | None) -> dict[str, Any] | None:
    """The counts for ``status`` (None when no file is configured).

    ``{"file", "state": "none" | "counted" | "unreadable", "since", "denied", "accounts":
    [{"account", "client", "denied", "last_topic", "last"}], "other_accounts_denied"}``;
    ``none``: the broker has refused nothing since the file was configured. When the plugin
    reads the broker's log, also ``"protocol_errors": {"log", "state", "error", "dropped",
    "other_sources", "sources": [{"source", "account", "client", "address", "errors",
    "last_error", "last"}]}`` with ``state`` ``reading``, ``foreign``, ``unreadable`` or
    ``checking`` (the broker stopped before it read its log).
    """
    if not path:
        return None
    absent = {"denied": 0, "accounts": []}
    return load_small_json(path, MAX_BYTES, "the plugin's counts", _counted, absent)


def _counted(data: Any) -> dict[str, Any]:
    accounts = [
        {
            "account": str(a["account"]),
            "client": str(a["client"]),
            "denied": int(a["denied"]),
            "last_topic": str(a["last_topic"]),
            "last": store.iso_utc(int(a["last_ms"])),
        }
        for a in data["accounts"]
    ]
    accounts.sort(key=lambda a: (-a["denied"], a["account"]))
    counted = {
        "state": "counted",
        "since": store.iso_utc(int(data["since_ms"])),
        "denied": int(data["denied"]),
        "other_accounts_denied": int(data["other_accounts_denied"]),
        "accounts": accounts,
    }
    if "broker_log" in data:
        counted["protocol_errors"] = _protocol_errors(data)
    return counted


def _protocol_errors(data: dict[str, Any]) -> dict[str, Any]:
    sources = [
        {
            "source": str(s["source"]),
            "account": str(s["account"]),
            "client": str(s["client"]),
            "address": str(s["address"]),
            "errors": int(s["errors"]),
            "last_error": str(s["last_error"]),
            "last": store.iso_utc(int(s["last_ms"])),
        }
        for s in data["protocol_error_sources"]
    ]
    sources.sort(key=lambda s: (-s["errors"], s["source"]))
    state = str(data["broker_log_state"])
    if state not in ("checking", "reading", "foreign", "unreadable"):
        raise ValueError(f"broker_log_state {state!r}")
    return {
        "log": str(data["broker_log"]),
        "state": state,
        "error": str(data["broker_log_error"]) or None,
        "dropped": int(data["protocol_errors"]),
        "other_sources": int(data["other_sources_protocol_errors"]),
        "sources": sources,
    }


def _source_name(s: dict[str, Any]) -> str:
    """The account, or before a login the address the packet came from."""
    if s["account"]:
        return s["account"]
    if s["address"]:
        return f"(no login) {s['address']}"
    return f"client {s['client']}"


def _protocol_lines(r: dict[str, Any]) -> list[str]:
    p = r.get("protocol_errors")
    if p is None:
        return []
    if p["state"] != "reading":
        return [f"broker dropped  unknown: {p['log']}: {p['error']}"]
    if not p["dropped"]:
        return ["broker dropped  nothing (no connection closed for a protocol error)"]
    lines = [f"broker dropped  {p['dropped']} connections for protocol errors since {r['since']}"]
    names = [_source_name(s) for s in p["sources"]]
    width = max(len(n) for n in names) if names else 0
    for name, s in zip(names, p["sources"], strict=True):
        client = "" if s["client"] in (s["account"], "<unknown>") else f" as client {s['client']}"
        origin = f" from {s['address']}" if s["address"] and s["account"] else ""
        lines.append(
            f"  {name:<{width}}  {s['errors']:>8} dropped{client}{origin}, last: "
            f"{s['last_error']} at {s['last']}"
        )
    if p["other_sources"]:
        lines.append(f"  (other sources) {p['other_sources']:>8} dropped")
    return lines


def render_refusals(r: dict[str, Any] | None) -> list[str]:
    """The lines of ``status`` (none when no file is configured)."""
    if r is None:
        return []
    if r["state"] == "unreadable":
        return [f"broker refused  unknown: {r['file']}: {r['error']}"]
    if r["state"] == "none" or not r["denied"]:
        return ["broker refused  nothing (no publish denied by its ACL)", *_protocol_lines(r)]
    lines = [f"broker refused  {r['denied']} publishes denied by its ACL since {r['since']}"]
    width = max(len(a["account"] or "(no account)") for a in r["accounts"]) if r["accounts"] else 0
    for a in r["accounts"]:
        name = a["account"] or "(no account)"
        client = "" if a["client"] == a["account"] else f" as client {a['client']}"
        lines.append(
            f"  {name:<{width}}  {a['denied']:>8} denied{client}, last on '{a['last_topic']}' "
            f"at {a['last']}"
        )
    if r["other_accounts_denied"]:
        lines.append(f"  (other accounts) {r['other_accounts_denied']:>8} denied")
    return lines + _protocol_lines(r)
