"""The long-running commands: ``collect``, ``poll``, ``upload``, ``usb-watch``.

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

    stop = StopFlag().install()
    return Collector(cfg, stop).run()


def poll(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate poll [--once]``; ``--once`` fails naming every node that failed."""
    from fieldgate.poller import Poller

    poller = Poller(cfg)
    try:
        if args.once:
            results = poller.once()
            failed = [r for r in results if not r.ok]
            if failed:
                names = "; ".join(f"{r.node} ({r.detail})" for r in failed)
                raise FieldgateError(
                    f"poll failed for {len(failed)} of {len(results)} nodes: {names}"
                )
            return 0
        poller.run(StopFlag().install())
        return 0
    finally:
        poller.close()


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
