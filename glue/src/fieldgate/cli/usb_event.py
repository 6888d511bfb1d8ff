"""``fieldgate usb-event add|remove DEVNAME``: what the udev rule runs.

It records the event for ``usb-watch`` and returns at once; it imports only the spool, so
udev is not kept waiting.
"""

from __future__ import annotations

import argparse

from fieldgate.config import Config
from fieldgate.usb.spool import normalize_devname, record_event


def usb_event(cfg: Config, args: argparse.Namespace) -> int:
    record_event(cfg.export.spool_dir, args.action, normalize_devname(args.devname))
    return 0
