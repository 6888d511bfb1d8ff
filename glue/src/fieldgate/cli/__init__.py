"""``fieldgate <command>``: a thin command line over the library modules.

:data:`COMMANDS` is the whole command line as a table: each command's name, where it is
implemented (``module:function`` in this package), its help and its options. A command's
module is imported only when it runs, so ``usb-event`` (run by udev) starts fast. Operator
mistakes become one line ``fieldgate: error: …`` on stderr and a non-zero exit status,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from fieldgate import __version__
from fieldgate.errors import FieldgateError

#: An option or argument: the flags/name and ``add_argument``'s keyword arguments.
Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **kw: Any) -> Arg:
    return flags, kw


@dataclass(frozen=True)
class OneOf:
    """Options of which exactly one must be given (``restore --as-site | --merge``)."""

    args: tuple[Arg, ...]


@dataclass(frozen=True)
class Command:
    """One command: ``name`` (``hub serve`` for a hub command), where it is implemented
    (``module:function`` under ``fieldgate.cli``), its help, its arguments, and whether it
    reads the gateway configuration (then it is called with ``(cfg, args)``, else
    ``(args)``)."""

    name: str
    target: str
    help: str
    args: tuple[Arg | OneOf, ...] = ()
    config: bool = True


DB = arg(
    "--db",
    required=True,
    metavar="DB",
    help="the hub's database: a SQLite file or postgresql://user@host:port/dbname",
)
DB_PASSWORD = arg(
    "--db-password-file",
    metavar="FILE",
    help="file holding the PostgreSQL password (else PGPASSWORD or ~/.pgpass)",
)
CREATE = arg(
    "--create",
    action="store_true",
    help="create the hub database (or its tables in an empty PostgreSQL database) if it "
    "does not exist; without it a missing one is an error (a mistyped --db)",
)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


COMMANDS: tuple[Command, ...] = (
    Command(
        "collect",
        "daemons:collect",
        "Long-running MQTT collector: store every reading, acknowledge only after commit.",
    ),
    Command(
        "poll",
        "daemons:poll",
        "Poll the configured HTTP nodes and Modbus devices into the store (long-running).",
        (
            arg(
                "--once",
                action="store_true",
                help="poll every node and Modbus device once and exit",
            ),
        ),
    ),
    Command(
        "status",
        "commands:status",
        "Store counts, backlog, batches, uploads, disk use, collector and export state.",
        (
            arg("--json", action="store_true", help="machine-readable output"),
            arg(
                "--prometheus",
                action="store_true",
                help="Prometheus text format (for node_exporter's textfile collector)",
            ),
            arg(
                "--output",
                metavar="FILE",
                help="write to FILE atomically (a temporary name, then a rename) instead of "
                "standard output",
            ),
        ),
    ),
    Command(
        "web",
        "daemons:web",
        "Long-running: serve the gateway's read-only page (latest readings, a device's last "
        "day, status) on web.listen_address:web.port.",
    ),
    Command(
        "upload",
        "daemons:upload",
        "Long-running: cut batches from new readings and upload them to the hub.",
        (arg("--once", action="store_true", help="cut and upload everything, then exit"),),
    ),
    Command(
        "register",
        "commands:register",
        "Obtain this gateway's key from the hub with a one-time PIN; write the key file.",
        (
            OneOf(
                (
                    arg("--pin", help="the PIN printed by 'fieldgate hub pin' (typed by hand)"),
                    arg(
                        "--pin-file",
                        metavar="F",
                        help="read the PIN from file F ('-': standard input), so that it "
                        "never shows in the process list",
                    ),
                )
            ),
        ),
    ),
    Command(
        "export",
        "commands:export",
        "Write a consistent export of the store and the site config into a directory.",
        (arg("--to", required=True, metavar="DIR", help="target directory (must exist)"),),
    ),
    Command(
        "usb-watch",
        "daemons:usb_watch",
        "Long-running USB export daemon: device events -> mount -> export -> LED.",
    ),
    Command(
        "usb-event",
        "usb_event:usb_event",
        "Record a USB block device event for usb-watch and return (run by udev).",
        (
            arg("action", choices=["add", "remove"]),
            arg("devname", metavar="DEVNAME", help="kernel name (sdb1) or node (/dev/sdb1)"),
        ),
    ),
    Command(
        "restore",
        "commands:restore",
        "Bring an exported database back into this gateway's store.",
        (
            arg("file", metavar="FILE.db", help="an exported fieldgate database"),
            OneOf(
                (
                    arg("--as-site", metavar="SERIAL", help="load its readings as site SERIAL"),
                    arg("--merge", action="store_true", help="merge into the current store"),
                )
            ),
            arg(
                "--force",
                action="store_true",
                help="proceed although the store holds readings not yet uploaded",
            ),
            arg(
                "--dry-run",
                action="store_true",
                help="only validate the file and say what it holds; change nothing",
            ),
        ),
    ),
    Command(
        "prune",
        "commands:prune",
        "Delete uploaded readings older than store.retention_days.",
    ),
    Command(
        "devices",
        "commands:devices",
        "The device allowlist as configured.",
        (
            arg("what", choices=["list"]),
            arg("--json", action="store_true", help="machine-readable output"),
        ),
    ),
    Command(
        "power-event",
        "commands:power_event",
        "Record a UPS power event in the store (run by apcupsd hooks).",
        (arg("event", help="apcupsd event name, e.g. onbattery, offbattery, doshutdown"),),
    ),
    Command(
        "check-config",
        "commands:check_config",
        "Validate the configuration file and exit (0 when valid).",
    ),
    Command(
        "check-configs",
        "commands:check_configs",
        "Validate several configurations given on stdin as one JSON object (name: YAML text); "
        "one error line per refused one (exit 2). Ansible's validation play checks every "
        "host's rendered configuration with it.",
        config=False,
    ),
    Command(
        "broker-conf",
        "broker:broker_conf",
        "Print the Mosquitto configuration lines the gateway's broker needs (the arrival-stamp "
        "plugin), building the plugin if no prebuilt one is found.",
        (
            arg("--plugin", metavar="FILE", help="a prebuilt plugin to use as is"),
            arg("--cache-dir", metavar="DIR", help="where to build it if need be"),
            arg("--cc", metavar="CC", help="build with this (cross) compiler"),
            arg(
                "--refusals-file",
                metavar="FILE",
                help="also count the publishes the broker's ACL denies into FILE "
                "(mqtt.broker_refusals_file; the broker needs an acl_file)",
            ),
            arg(
                "--broker-log",
                metavar="FILE",
                help="also count the connections the broker drops for protocol errors, read "
                "from its log FILE (its log_dest file, with log_type notice) into the "
                "--refusals-file",
            ),
        ),
        config=False,
    ),
    Command(
        "pull-run",
        "commands:pull_run",
        "Run the given ansible-pull command line (after --), pass its output through and "
        "record its outcome (result, changed count, duration) in --result-file for status.",
        (
            arg(
                "--result-file",
                required=True,
                metavar="FILE",
                help="where the outcome is written (pull.result_file of the configuration)",
            ),
            arg("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ..."),
        ),
        config=False,
    ),
    Command(
        "hub serve",
        "hub:serve",
        "Serve the hub API over HTTP (uploads from gateways, the read API for users).",
        (
            DB,
            DB_PASSWORD,
            arg("--listen", required=True, type=_host_port, metavar="HOST:PORT"),
            arg("--workers", type=int, default=2, help="worker processes (default 2)"),
            arg("--threads", type=int, default=4, help="threads per worker (default 4)"),
            arg(
                "--upload-ttl-secs",
                type=float,
                default=3600,
                help="how long an upload URL stays valid (default 3600)",
            ),
            arg(
                "--max-upload-mb",
                type=float,
                default=256,
                help="largest batch zip accepted, in MiB (default 256)",
            ),
            arg(
                "--retention-days",
                type=float,
                metavar="N",
                help="delete readings older than N days in the background (default: keep all)",
            ),
            arg(
                "--trusted-proxies",
                type=int,
                default=0,
                metavar="N",
                help="reverse proxies in front whose X-Forwarded-For/-Proto/-Host to believe",
            ),
            arg(
                "--client-timeout",
                type=float,
                default=15,
                metavar="SECS",
                help="a client's request line and headers must arrive within SECS, a body "
                "gets SECS before --min-body-rate counts (default 15)",
            ),
            arg(
                "--min-body-rate",
                type=float,
                default=4096,
                metavar="BYTES",
                help="bytes per second a request body must average (default 4096)",
            ),
        ),
        config=False,
    ),
    Command(
        "hub pin",
        "hub:pin",
        "Print a one-time registration PIN for a gateway.",
        (
            DB,
            DB_PASSWORD,
            CREATE,
            arg("--serial", required=True),
            arg(
                "--valid-hours",
                type=float,
                default=24,
                help="how long the PIN is valid (default 24)",
            ),
        ),
        config=False,
    ),
    Command(
        "hub import",
        "hub:import_",
        "Ingest an exported gateway database directly.",
        (DB, DB_PASSWORD, CREATE, arg("file", metavar="FILE.db")),
        config=False,
    ),
    Command(
        "hub prune",
        "hub:prune",
        "Delete the hub's readings older than N days now (hub serve --retention-days does it "
        "in the background).",
        (DB, DB_PASSWORD, arg("--days", type=float, required=True, metavar="N")),
        config=False,
    ),
    Command(
        "hub user add",
        "hub:user_add",
        "Add a user who may read the gateways of some domains; the password is read from "
        "standard input.",
        (
            DB,
            DB_PASSWORD,
            CREATE,
            arg("name", metavar="NAME"),
            arg("--domains", default="", metavar="D1,D2", help="comma-separated domains"),
            arg("--admin", action="store_true", help="sees every gateway"),
            arg(
                "--update",
                action="store_true",
                help="if the user exists, make it so (changes only what differs; says "
                "'unchanged' when nothing did)",
            ),
        ),
        config=False,
    ),
    Command(
        "hub user remove",
        "hub:user_remove",
        "Remove a user.",
        (DB, DB_PASSWORD, arg("name", metavar="NAME")),
        config=False,
    ),
    Command(
        "hub user list",
        "hub:user_list",
        "List the users, whether they are admins, and their domains.",
        (DB, DB_PASSWORD, arg("--json", action="store_true", help="machine-readable output")),
        config=False,
    ),
    Command(
        "hub gateway domain",
        "hub:gateway_domain",
        "Put a gateway in a domain (new gateways are in domain 'default').",
        (
            DB,
            DB_PASSWORD,
            CREATE,
            arg("serial", metavar="SERIAL"),
            arg("domain", metavar="DOMAIN"),
        ),
        config=False,
    ),
)


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of docs/contract.md §3."""

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


def _add_args(p: argparse.ArgumentParser, args: tuple[Arg | OneOf, ...]) -> None:
    for a in args:
        if isinstance(a, OneOf):
            group = p.add_mutually_exclusive_group(required=True)
            for flags, kw in a.args:
                group.add_argument(*flags, **kw)
        else:
            p.add_argument(*a[0], **a[1])


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, from :data:`COMMANDS`."""
    parser = _Parser(
        prog="fieldgate",
        description="Field data gateway: collect sensor readings into a local store, "
        "batch and upload them to a hub, export them to a USB drive, restore them.",
    )
    parser.add_argument("--version", action="version", version=f"fieldgate {__version__}")
    _add_config(parser, default=None)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    sub.required = True
    groups: dict[str, Any] = {"": sub}
    for cmd in COMMANDS:
        *path, name = cmd.name.split(" ")
        subs = _group(groups, path)
        p = subs.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.config:
            _add_config(p)
        _add_args(p, cmd.args)
    return parser


#: Help of the command groups (``fieldgate hub …``, ``fieldgate hub user …``).
GROUPS = {
    "hub": "The reference central receiver gateways upload to, and its users.",
    "hub user": "The people (and programs) who may read the hub, and their domains.",
    "hub gateway": "Gateways as the hub knows them.",
}


def _group(groups: dict[str, Any], path: list[str]) -> Any:
    """The subparsers of a command group, made on first use."""
    key = " ".join(path)
    if key not in groups:
        parent = _group(groups, path[:-1])
        p = parent.add_parser(path[-1], help=GROUPS[key], description=GROUPS[key])
        subs = p.add_subparsers(
            dest=_dest(key), metavar=f"<{key.replace(' ', '-')}-command>", parser_class=_Parser
        )
        subs.required = True
        groups[key] = subs
    return groups[key]


def _dest(group: str) -> str:
    return group.replace(" ", "_") + "_command"


def command_name(args: argparse.Namespace) -> str:
    """The full name of the command ``args`` were parsed for (``hub user add``)."""
    name = args.command
    while _dest(name) in vars(args):
        name = f"{name} {getattr(args, _dest(name))}"
    return name


def _resolve(target: str) -> Callable[..., int | None]:
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(f"fieldgate.cli.{module_name}"), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fieldgate`` console script."""
    args = build_parser().parse_args(argv)
    name = command_name(args)
    cmd = next(c for c in COMMANDS if c.name == name)
    try:
        from fieldgate.daemon import setup_logging

        if cmd.config:
            from fieldgate.config import load_config

            cfg = load_config(args.config)
            setup_logging(
                cfg.log.level,
                journal=f"fieldgate-{name.replace(' ', '-')}" if cfg.log.journal else None,
                journal_socket=cfg.log.journal_socket,
            )
            return int(_resolve(cmd.target)(cfg, args) or 0)
        setup_logging("INFO")
        return int(_resolve(cmd.target)(args) or 0)
    except FieldgateError as exc:
        sys.stderr.write(f"fieldgate: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except sqlite3.DatabaseError as exc:
        sys.stderr.write(f"fieldgate: error: database: {exc}\n")
        return 1
    except Exception as exc:
        if not type(exc).__module__.startswith("psycopg"):  # PostgreSQL's errors, in one line
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        sys.stderr.write(f"fieldgate: error: database: {first}\n")
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"fieldgate: error: {where}{exc.strerror or exc}\n")
        return 1


__all__ = ["COMMANDS", "build_parser", "main"]
