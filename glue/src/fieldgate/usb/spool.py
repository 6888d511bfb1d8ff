"""The USB event spool: what ``usb-event`` (run by udev) leaves for ``usb-watch``.

A udev RUN program must be short-lived and may not mount, so ``usb-event`` only drops one
small file per event into ``export.spool_dir`` (written under a temporary name, fsynced and
renamed: atomic and durable) and exits. ``usb-watch`` reads them oldest first. This module
imports nothing heavy: udev waits for it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fieldgate import fsutil
from fieldgate.errors import FieldgateError

#: Kernel block device names (``sdb1``, ``mmcblk0p1``, ``nvme0n1p2``).
DEVNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")


def normalize_devname(name: str) -> str:
    """``/dev/sdb1`` or ``sdb1`` -> ``sdb1``; anything else is refused."""
    text = name.strip()
    if text.startswith("/dev/"):
        text = text[len("/dev/") :]
    if not DEVNAME_RE.match(text):
        raise FieldgateError(f"{name!r} is not a block device name (expected e.g. sdb1)")
    return text


@dataclass(frozen=True)
class Event:
    """One recorded device event."""

    path: Path
    action: str
    devname: str


def record_event(spool_dir: str | Path, action: str, devname: str) -> Path:
    """Drop one event into the spool atomically (temporary name, then rename)."""
    if action not in ("add", "remove"):
        raise FieldgateError(f"unknown device action {action!r} (add or remove)")
    spool = Path(spool_dir)
    try:
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FieldgateError(f"cannot create spool directory {spool}: {exc.strerror}") from None
    name = f"{time.time_ns():020d}-{os.getpid():07d}.event"
    body = json.dumps({"action": action, "devname": devname, "at_ns": time.time_ns()})
    try:
        fsutil.atomic_write(spool / name, (body + "\n").encode(), tmp=spool / f".{name}.tmp")
    except OSError as exc:
        raise FieldgateError(f"cannot record the event in {spool}: {exc.strerror}") from None
    return spool / name


def pending_events(spool_dir: str | Path) -> list[Event | Path]:
    """Recorded events, oldest first; an unreadable event file is returned as its path."""
    spool = Path(spool_dir)
    try:
        names = sorted(p.name for p in spool.iterdir() if p.name.endswith(".event"))
    except FileNotFoundError:
        return []
    out: list[Event | Path] = []
    for name in names:
        path = spool / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            out.append(Event(path, str(data["action"]), normalize_devname(str(data["devname"]))))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError, FieldgateError):
            out.append(path)
    return out
