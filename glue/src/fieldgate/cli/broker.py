"""``fieldgate broker-conf``: the Mosquitto lines the gateway's broker needs (CONTRACT §9).

It needs no configuration file: the mosquitto role and every test broker run it before the
broker starts. The library part (finding or building the plugin) is :mod:`fieldgate.broker`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldgate.broker import conf_lines, locate_plugin


def broker_conf(args: argparse.Namespace) -> int:
    """Print the lines, building the plugin if no prebuilt one is found."""
    plugin = locate_plugin(
        Path(args.plugin) if args.plugin else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        cc=args.cc,
    )
    refusals = Path(args.refusals_file) if args.refusals_file else None
    broker_log = Path(args.broker_log) if args.broker_log else None
    print("\n".join(conf_lines(plugin, refusals, broker_log)))
    return 0
