"""The long-running commands: ``collect``, ``poll``, ``upload``, ``usb-watch``, ``web``.

Each installs the stop flag (SIGTERM, SIGINT) and runs its daemon until stopped; what they
say goes to the log (supervisor keeps it), not to stdout. Each imports its daemon's module
only when it runs: a daemon's process (and the collector's forked store writer) carries no
other daemon's libraries, which keeps its memory down (the collector's is a benchmark
target).
"""

from __future__ import annotations

import argparse

from fieldgate.config import Config
from fieldgate.daemon import StopFlag
from fieldgate.errors import FieldgateError


def collect(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate collect``: run the collector until SIGTERM/SIGINT."""
    from fieldgate.collector import Collector
    from fieldgate.diskguard import open_store_when_room
    from fieldgate.live import LiveState

    stop = StopFlag().install()
    live = LiveState(cfg.store.path)
    try:
        if not open_store_when_room(cfg, stop, live.set):
            return 0  # stopped while waiting for disk space
        return Collector(cfg, stop, live).run()
    finally:
        live.close()


def poll(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate poll [--once]``; ``--once`` fails naming every node and device that failed."""
    from fieldgate import poller

    if not args.once:
        poller.serve(cfg, StopFlag().install())
        return 0
    nodes, devices = poller.poll_once(cfg)
    bad_nodes = [r for r in nodes if not r.ok]
    bad_devices = [r for r in devices if not r.ok]
    if bad_nodes or bad_devices:
        counts = []
        if nodes:
            counts.append(f"{len(bad_nodes)} of {len(nodes)} nodes")
        if devices:
            counts.append(f"{len(bad_devices)} of {len(devices)} Modbus devices")
        names = [f"{r.node} ({r.detail})" for r in bad_nodes]
        names += [f"{r.device} ({r.detail})" for r in bad_devices]
        raise FieldgateError(f"poll failed for {' and '.join(counts)}: {'; '.join(names)}")
    return 0


def upload(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate upload [--once]``."""
    from fieldgate import uploader

    return uploader.serve(cfg, once=args.once, stop=StopFlag().install())


def usb_watch(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate usb-watch``: the long-running USB export daemon."""
    from fieldgate.usb.watcher import Watcher

    watcher = Watcher(cfg, StopFlag().install())
    try:
        watcher.start()
        watcher.run()
    finally:
        watcher.log.close()
    return 0


def web(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate web``: the gateway's read-only page until SIGTERM/SIGINT."""
    from fieldgate.web.server import serve

    return serve(cfg, StopFlag().install())
