"""The one-shot gateway commands: they call the library and print what it returns.

``status``, ``register``, ``export``, ``restore``, ``prune``, ``devices list``,
``power-event``, ``check-config`` and ``check-configs``. Their output lines are part of the
command line's contract (docs/contract.md §3): scripts and tests read them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fieldgate import store
from fieldgate.config import Config
from fieldgate.errors import ConfigError, FieldgateError
from fieldgate.export import export_to_dir
from fieldgate.exportdb import inspect_export
from fieldgate.fsutil import atomic_write, human_bytes
from fieldgate.prune import day_text, prune_store
from fieldgate.restore import restore_as_site, restore_merge
from fieldgate.status import collect_status, render_text
from fieldgate.topics import parse_template

#: The units ``prune`` has always printed (steps of 1024, labelled kB and MB).
PRUNE_SIZE_UNITS = ("bytes", "kB", "MB")


def status(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate status [--json | --prometheus] [--output FILE]``."""
    if args.json and args.prometheus:
        raise FieldgateError("status: give --json or --prometheus, not both")
    s = collect_status(cfg)
    if args.json:
        text = json.dumps(s, indent=2, sort_keys=True) + "\n"
    elif args.prometheus:
        from fieldgate.prometheus import render

        text = render(s)
    else:
        text = render_text(s)
    if args.output is None:
        print(text, end="")
        return 0
    out = Path(args.output)
    if not out.parent.is_dir():
        raise FieldgateError(f"status --output: directory {out.parent} does not exist")
    # node_exporter (another user) reads it: readable by all, whatever the umask
    atomic_write(out, text.encode(), mode=0o644)
    return 0


#: A PIN read from a file or standard input is at most this long (anything longer is not
#: a PIN, and is refused before it is read whole).
PIN_MAX_BYTES = 1024


def read_pin(source: str) -> str:
    """The PIN in file ``source`` (``-``: standard input), stripped; never echoed in errors."""
    where = "standard input" if source == "-" else source
    try:
        if source == "-":
            data = sys.stdin.buffer.read(PIN_MAX_BYTES + 1)
        else:
            with Path(source).open("rb") as f:
                data = f.read(PIN_MAX_BYTES + 1)
    except FileNotFoundError:
        raise FieldgateError(f"--pin-file: {where} does not exist") from None
    except OSError as exc:
        raise FieldgateError(f"--pin-file: cannot read {where}: {exc.strerror}") from None
    if len(data) > PIN_MAX_BYTES:
        raise FieldgateError(
            f"--pin-file: {where} holds more than {PIN_MAX_BYTES} bytes: not a PIN"
        )
    try:
        pin = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FieldgateError(f"--pin-file: {where} is not text: not a PIN") from None
    if not pin:
        raise FieldgateError(f"--pin-file: no PIN in {where}")
    return pin


def register(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate register (--pin PIN | --pin-file F)``: exchange a one-time PIN for this
    gateway's key (``--pin-file -`` reads it from standard input, out of the process list)."""
    from fieldgate.uploader import register as register_with_hub  # requests: only here

    pin = args.pin if args.pin is not None else read_pin(args.pin_file)
    path = register_with_hub(cfg, pin)
    print(f"registered {cfg.site.serial} with {cfg.upload.url}; key written to {path} (0600)")
    return 0


def export(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate export --to DIR``: print the paths of the files written."""
    for path in export_to_dir(cfg, Path(args.to)).files:
        print(path)
    return 0


def restore(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate restore FILE.db (--as-site SERIAL | --merge) [--force] [--dry-run]``."""
    if args.dry_run:
        info = inspect_export(args.file)
        span = ""
        if info.first_ts is not None and info.last_ts is not None:
            span = f" from {store.iso_utc(info.first_ts)} to {store.iso_utc(info.last_ts)}"
        checked = (
            f"; checksum verified with {info.checksum_file.name}" if info.checksum_file else ""
        )
        print(
            f"{info.path.name}: valid fieldgate store of site {info.site_serial} (schema "
            f"{info.schema_version}), {info.readings} readings{span}{checked}; nothing changed"
        )
        return 0
    if args.merge:
        r = restore_merge(cfg, args.file)
    else:
        r = restore_as_site(cfg, args.file, args.as_site, force=args.force)
    origin = "" if r.info.site_serial == r.site else f" (exported by site {r.info.site_serial})"
    checked = (
        f", checksum verified with {r.info.checksum_file.name}" if r.info.checksum_file else ""
    )
    print(
        f"restored {r.info.path.name}{origin} into site {r.site}: {r.info.readings} readings, "
        f"{r.new} new, {r.present} already present{checked}"
    )
    if r.new:
        print(f"{r.new} readings wait for upload ('fieldgate upload' sends them)")
    return 0


def prune(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate prune``: one line saying what was deleted and what is free."""
    r = prune_store(cfg)
    files = f", {r.files} uploaded batch files deleted" if r.files else ""
    older = (
        f", {r.rejected} rejected messages and {r.events} events older than that"
        if r.rejected or r.events
        else ""
    )
    print(
        f"pruned {r.readings} readings uploaded before {day_text(r.cutoff_ms)} "
        f"(retention {cfg.store.retention_days} days) from {r.batches} batches{files}{older}; "
        f"{human_bytes(r.free_bytes, PRUNE_SIZE_UNITS)} free in the store file for new readings"
    )
    return 0


def devices(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate devices list [--json]``."""
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


def power_event(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate power-event EVENT``: keep a UPS event where ``status`` shows it."""
    conn = store.open_store(
        cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
    )
    try:
        with store.transaction(conn):
            store.add_event(conn, "power", args.event)
            store.set_state(conn, "power.last_event", args.event)
    finally:
        conn.close()
    return 0


def check_config(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate check-config``: loading already validated it; then what the collector
    subscribes to and how each input and poll node is read."""
    print(f"{cfg.path}: valid (site {cfg.site.serial}, {len(cfg.devices.list)} devices)")
    inputs = [(cfg.mqtt.native_topic, "fieldgate")]
    inputs += [(i.topic, i.format) for i in cfg.mqtt.inputs]
    for topic, fmt in inputs:
        print(f"input {topic} ({fmt}): subscribes to {parse_template(topic).filter}")
    for node in cfg.poll.nodes:
        print(f"poll node {node.name} ({node.format}): {node.url} for device {node.device}")
    return 0


def check_configs(args: argparse.Namespace) -> int:
    """``fieldgate check-configs``: a JSON object of configurations (YAML text by name) on
    stdin; one ``fieldgate: error: NAME: …`` line on stderr for each refused one (exit 2),
    ``NAME: valid`` on stdout for each accepted one."""
    from fieldgate.config import check_configs as check_all

    try:
        texts = json.load(sys.stdin)
    except ValueError as exc:
        raise ConfigError(f"stdin: not a JSON object of configurations: {exc}") from None
    if not isinstance(texts, dict) or not all(isinstance(v, str) for v in texts.values()):
        raise ConfigError("stdin: not a JSON object of configurations (name: YAML text)")
    problems = check_all(texts)
    for name, problem in problems.items():
        if problem:
            sys.stderr.write(f"fieldgate: error: {problem}\n")
        else:
            print(f"{name}: valid")
    return 2 if any(problems.values()) else 0


def pull_run(args: argparse.Namespace) -> int:
    """``fieldgate pull-run --result-file FILE -- COMMAND ...`` (the pull timer's service)."""
    from fieldgate.pull import run_and_record

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return run_and_record(argv, Path(args.result_file))
