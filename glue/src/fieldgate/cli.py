"""``fieldgate <command>``: a thin command line over the library modules.

Each command is dispatched to ``module:function``; the module is imported only when its
command runs, so ``usb-event`` (run by udev) starts fast. Operator mistakes become one line
``fieldgate: error: …`` on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from fieldgate import __version__
from fieldgate.errors import ConfigError, FieldgateError


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of the CONTRACT."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"fieldgate: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _add_config(p: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="configuration file (default: $FIELDGATE_CONFIG or /etc/fieldgate/fieldgate.yaml)",
    )


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


# name -> (target "module:function", needs gateway configuration)
Command = tuple[str, bool]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The whole command line, and where each command is implemented."""
    parser = _Parser(
        prog="fieldgate",
        description="Field data gateway: collect sensor readings into a local store, "
        "batch and upload them to a hub, export them to a USB drive, restore them.",
    )
    parser.add_argument("--version", action="version", version=f"fieldgate {__version__}")
    _add_config(parser, default=None)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    sub.required = True
    targets: dict[str, Command] = {}

    def command(
        name: str, target: str, help_: str, *, config: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if config:
            _add_config(p)
        targets[name] = (target, config)
        return p

    command(
        "collect",
        "fieldgate.collector:collect_cmd",
        "Long-running MQTT collector: store every reading, acknowledge only after commit.",
    )

    p = command(
        "poll",
        "fieldgate.poller:poll_cmd",
        "Poll the configured HTTP nodes into the store (long-running).",
    )
    p.add_argument("--once", action="store_true", help="poll every node once and exit")

    p = command(
        "status",
        "fieldgate.status:status_cmd",
        "Store counts, backlog, batches, uploads, disk use, collector and export state.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command(
        "upload",
        "fieldgate.uploader:upload_cmd",
        "Long-running: cut batches from new readings and upload them to the hub.",
    )
    p.add_argument("--once", action="store_true", help="cut and upload everything, then exit")

    p = command(
        "register",
        "fieldgate.uploader:register_cmd",
        "Obtain this gateway's key from the hub with a one-time PIN; write the key file.",
    )
    p.add_argument("--pin", required=True, help="the PIN printed by 'fieldgate hub pin'")

    p = command(
        "export",
        "fieldgate.export:export_cmd",
        "Write a consistent export of the store and the site config into a directory.",
    )
    p.add_argument("--to", required=True, metavar="DIR", help="target directory (must exist)")

    command(
        "usb-watch",
        "fieldgate.usb:watch_cmd",
        "Long-running USB export daemon: device events -> mount -> export -> LED.",
    )

    p = command(
        "usb-event",
        "fieldgate.usb:event_cmd",
        "Record a USB block device event for usb-watch and return (run by udev).",
    )
    p.add_argument("action", choices=["add", "remove"])
    p.add_argument("devname", metavar="DEVNAME", help="kernel name (sdb1) or node (/dev/sdb1)")

    p = command(
        "restore",
        "fieldgate.restore:restore_cmd",
        "Bring an exported database back into this gateway's store.",
    )
    p.add_argument("file", metavar="FILE.db", help="an exported fieldgate database")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--as-site", metavar="SERIAL", help="load its readings as site SERIAL")
    how.add_argument("--merge", action="store_true", help="merge into the current store")
    p.add_argument(
        "--force",
        action="store_true",
        help="proceed although the store holds readings not yet uploaded",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only validate the file and say what it holds; change nothing",
    )

    command(
        "prune",
        "fieldgate.prune:prune_cmd",
        "Delete uploaded readings older than store.retention_days.",
    )

    p = command("devices", "fieldgate.cli:devices_cmd", "The device allowlist as configured.")
    p.add_argument("what", choices=["list"])
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command(
        "power-event",
        "fieldgate.cli:power_event_cmd",
        "Record a UPS power event in the store (run by apcupsd hooks).",
    )
    p.add_argument("event", help="apcupsd event name, e.g. onbattery, offbattery, doshutdown")

    command(
        "check-config",
        "fieldgate.cli:check_config_cmd",
        "Validate the configuration file and exit (0 when valid).",
    )

    hub = sub.add_parser(
        "hub",
        help="The reference central receiver.",
        description="The reference central receiver gateways upload to.",
    )
    hub_sub = hub.add_subparsers(dest="hub_command", metavar="<hub-command>", parser_class=_Parser)
    hub_sub.required = True

    def hub_command(name: str, target: str, help_: str) -> argparse.ArgumentParser:
        p = hub_sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--db", required=True, metavar="PATH", help="the hub's SQLite database")
        targets[f"hub {name}"] = (target, False)
        return p

    p = hub_command("serve", "fieldgate.hub.cli:serve_cmd", "Serve the upload API over HTTP.")
    p.add_argument("--listen", required=True, type=_host_port, metavar="HOST:PORT")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument(
        "--upload-ttl-secs",
        type=float,
        default=3600,
        help="how long an upload URL stays valid (default 3600)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=256,
        help="largest batch zip accepted, in MiB (default 256)",
    )
    p = hub_command(
        "pin", "fieldgate.hub.cli:pin_cmd", "Print a one-time registration PIN for a gateway."
    )
    p.add_argument("--serial", required=True)
    p.add_argument(
        "--valid-hours", type=float, default=24, help="how long the PIN is valid (default 24)"
    )
    p = hub_command(
        "import", "fieldgate.hub.cli:import_cmd", "Ingest an exported gateway database directly."
    )
    p.add_argument("file", metavar="FILE.db")
    return parser, targets


def _resolve(target: str) -> Callable[..., int | None]:
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fieldgate`` console script."""
    parser, targets = build_parser()
    args = parser.parse_args(argv)
    name = args.command if args.command != "hub" else f"hub {args.hub_command}"
    target, needs_config = targets[name]
    try:
        if needs_config:
            from fieldgate.config import load_config
            from fieldgate.daemon import setup_logging

            cfg = load_config(args.config)
            setup_logging(cfg.log.level)
            return int(_resolve(target)(cfg, args) or 0)
        from fieldgate.daemon import setup_logging

        setup_logging("INFO")
        return int(_resolve(target)(args) or 0)
    except FieldgateError as exc:
        sys.stderr.write(f"fieldgate: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except sqlite3.DatabaseError as exc:
        sys.stderr.write(f"fieldgate: error: database: {exc}\n")
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"fieldgate: error: {where}{exc.strerror or exc}\n")
        return 1


# Small commands that need no module of their own.


def devices_cmd(cfg: Any, args: argparse.Namespace) -> int:
    """``fieldgate devices list``."""
    rows = [
        {
            "serial": d.serial,
            "alias": d.alias,
            "format": d.format,
            "csv_columns": d.csv_columns,
            "description": d.description,
        }
        for d in cfg.devices.list
    ]
    if args.json:
        print(json.dumps({"allow_unknown": cfg.devices.allow_unknown, "devices": rows}, indent=2))
        return 0
    if not rows:
        print("no devices configured")
    else:
        width = max(len("SERIAL"), *(len(r["serial"]) for r in rows))
        awidth = max(len("ALIAS"), *(len(r["alias"] or "-") for r in rows))
        print(f"{'SERIAL':<{width}}  {'ALIAS':<{awidth}}  FORMAT")
        for r in rows:
            fmt = r["format"] + (f" ({','.join(r['csv_columns'])})" if r["csv_columns"] else "")
            print(f"{r['serial']:<{width}}  {(r['alias'] or '-'):<{awidth}}  {fmt}")
    state = "accepted" if cfg.devices.allow_unknown else "rejected"
    print(f"unknown devices: {state}")
    return 0


def power_event_cmd(cfg: Any, args: argparse.Namespace) -> int:
    """``fieldgate power-event EVENT``: keep a UPS event where ``status`` shows it."""
    from fieldgate import store

    conn = store.open_store(
        cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
    )
    with store.transaction(conn):
        store.add_event(conn, "power", args.event)
        store.set_state(conn, "power.last_event", args.event)
    conn.close()
    return 0


def check_config_cmd(cfg: Any, args: argparse.Namespace) -> int:
    """``fieldgate check-config``: loading already validated it."""
    print(f"{cfg.path}: valid (site {cfg.site.serial}, {len(cfg.devices.list)} devices)")
    return 0


__all__ = ["ConfigError", "build_parser", "main"]
