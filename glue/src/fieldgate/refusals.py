"""What the gateway's broker refused: publishes its ACL denied, counted per account.

Mosquitto acknowledges a PUBLISH its ACL denies (a topic the account may not use, an extra
topic level) and drops it, naming it only in its debug log. The fieldgate broker plugin counts
them when loaded with ``plugin_opt_refusals_file`` (``fieldgate broker-conf --refusals-file``)
and writes the counts since the broker started as JSON, at most once a second, only after a
change; ``mqtt.broker_refusals_file`` names that file for ``fieldgate status``. Reading it is
cheap and bounded: one small file (the plugin keeps at most 256 accounts), refused beyond
:data:`MAX_BYTES`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fieldgate import store

#: The plugin writes at most 256 accounts of ~400 bytes each.
MAX_BYTES = 256 * 1024


def broker_refusals(path: str | None) -> dict[str, Any] | None:
    """The counts for ``status`` (None when no file is configured).

    ``{"file", "state": "none" | "counted" | "unreadable", "since", "denied", "accounts":
    [{"account", "client", "denied", "last_topic", "last"}], "other_accounts_denied"}``;
    ``none``: the broker has refused nothing since the file was configured.
    """
    if not path:
        return None
    result: dict[str, Any] = {"file": path}
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {**result, "state": "none", "denied": 0, "accounts": []}
    except OSError as exc:
        return {**result, "state": "unreadable", "error": exc.strerror or str(exc)}
    try:
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        data = json.loads(raw)
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
        return {
            **result,
            "state": "counted",
            "since": store.iso_utc(int(data["since_ms"])),
            "denied": int(data["denied"]),
            "other_accounts_denied": int(data["other_accounts_denied"]),
            "accounts": accounts,
        }
    except (ValueError, KeyError, TypeError) as exc:
        return {**result, "state": "unreadable", "error": f"not the plugin's counts ({exc})"}


def render_refusals(r: dict[str, Any] | None) -> list[str]:
    """The lines of ``status`` (none when no file is configured)."""
    if r is None:
        return []
    if r["state"] == "unreadable":
        return [f"broker refused  unknown: {r['file']}: {r['error']}"]
    if r["state"] == "none" or not r["denied"]:
        return ["broker refused  nothing (no publish denied by its ACL)"]
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
    return lines
