"""``fieldgate hub …``: run the reference hub, issue PINs, import exports, prune, and keep
its users and gateway domains."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fieldgate.errors import FieldgateError
from fieldgate.hub.backends import is_postgresql, open_storage
from fieldgate.hub.storage import HubStorage
from fieldgate.names import ALLOWED, is_name
from fieldgate.store import iso_utc


@contextmanager
def _storage(args: argparse.Namespace) -> Iterator[HubStorage]:
    """The hub storage of ``--db``; a database that does not exist is an error unless the
    command has ``--create`` and it was given (a mistyped path must not become a new, empty
    hub database that the command then reports success on)."""
    create = getattr(args, "create", False)
    sqlite = not is_postgresql(args.db) and args.db_password_file is None  # else: its error
    if not create and sqlite and not Path(args.db).exists():
        raise FieldgateError(
            f"hub database {args.db} does not exist (a mistyped --db?); --create creates a new one"
        )
    st = open_storage(args.db, create=create, password_file=args.db_password_file)
    try:
        yield st
    finally:
        st.close()


def serve(args: argparse.Namespace) -> int:
    """``fieldgate hub serve --db DB --listen HOST:PORT``: the API under gunicorn."""
    try:
        from fieldgate.hub import server
    except ModuleNotFoundError as exc:
        if exc.name not in ("flask", "gunicorn", "werkzeug"):
            raise
        raise FieldgateError(
            "'fieldgate hub serve' needs the hub extra (Flask, gunicorn): "
            "pip install 'fieldgate[hub]'"
        ) from None
    host, port = args.listen
    try:
        server.serve(
            args.db,
            host,
            port,
            workers=args.workers,
            threads=args.threads,
            upload_ttl_secs=float(args.upload_ttl_secs),
            max_upload_bytes=int(float(args.max_upload_mb) * 1024 * 1024),
            password_file=args.db_password_file,
            trusted_proxies=args.trusted_proxies,
            retention_days=args.retention_days,
            client_timeout=args.client_timeout,
            min_body_rate=args.min_body_rate,
        )
    except SystemExit as exc:  # gunicorn's way out, also of a clean stop (SIGTERM)
        if exc.code not in (0, None):
            raise
        # stopped cleanly: the workers are gone, the retention process stopped, no
        # storage open here
        server.leave()
    return 0


def pin(args: argparse.Namespace) -> int:
    """``fieldgate hub pin --db DB --serial SERIAL``: print a one-time registration PIN."""
    if not is_name(args.serial):
        raise FieldgateError(f"{args.serial!r} is not a valid gateway serial")
    with _storage(args) as st:
        new_pin = st.create_pin(args.serial, int(float(args.valid_hours) * 3600))
    print(new_pin)
    return 0


def import_(args: argparse.Namespace) -> int:
    """``fieldgate hub import --db DB FILE.db``: ingest an exported gateway database."""
    # here, not at the top: ``hub serve`` (and its workers) never import an export
    from fieldgate.exportdb import inspect_export
    from fieldgate.hub.imports import import_export

    info = inspect_export(args.file)  # before the hub database is opened (or created)
    with _storage(args) as st:
        new = import_export(st, info)
    name = Path(args.file).name
    print(f"imported {name} for {info.site_serial}: {info.readings} readings, {new} new")
    return 0


def prune(args: argparse.Namespace) -> int:
    """``fieldgate hub prune --db DB --days N``: one retention pass now."""
    from fieldgate.hub.retention import prune as prune_pass

    if not args.days > 0:
        raise FieldgateError("--days must be more than 0")
    with _storage(args) as st:
        deleted, cutoff = prune_pass(st, args.days)
    print(f"pruned {deleted} readings older than {iso_utc(cutoff)} ({args.days:g} days)")
    return 0


# Users ------------------------------------------------------------------------------------


def _check_name(what: str, name: str) -> str:
    if not is_name(name):
        raise FieldgateError(f"{name!r:.70} is not a valid {what} ({ALLOWED['name']}, 1-64)")
    return name


def _domains(text: str, *, admin: bool) -> list[str]:
    domains = sorted({d.strip() for d in text.split(",") if d.strip()})
    for d in domains:
        _check_name("domain", d)
    if not domains and not admin:
        raise FieldgateError("a user who is not --admin needs --domains D1[,D2…]")
    return domains


def read_password(name: str) -> str:
    """The password from standard input: its first line (a terminal is asked twice,
    without echo). Never from the command line, where ps shows it."""
    from fieldgate.hub.passwords import PasswordError, check_new_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise FieldgateError("the two passwords differ; nothing was changed")
    else:
        line = sys.stdin.readline()
        if not line:
            raise FieldgateError(f"no password on standard input for user {name}")
        password = line.rstrip("\r\n")
    try:
        check_new_password(password)
    except PasswordError as exc:
        raise FieldgateError(str(exc)) from None
    return password


def user_add(args: argparse.Namespace) -> int:
    """``fieldgate hub user add --db DB NAME --domains D1,D2 [--admin] [--update]``."""
    from fieldgate.hub.passwords import hash_password, verify_password

    name = _check_name("user name", args.name)
    domains = _domains(args.domains, admin=args.admin)
    password = read_password(name)
    with _storage(args) as st:
        found = st.user(name)
        if found is None:
            st.add_user(name, hash_password(password), domains, admin=args.admin)
            role = "admin" if args.admin else "user"
            print(f"added {role} {name} (domains: {', '.join(domains) or 'none'})")
            return 0
        if not args.update:
            raise FieldgateError(f"user {name} exists; use 'hub user add --update' to change it")
        changed = []
        new_hash = None
        if not verify_password(password, found.password_hash):
            new_hash = hash_password(password)
            changed.append("password")
        if list(found.domains) != domains:
            changed.append("domains")
        if found.admin != args.admin:
            changed.append("admin")
        if not changed:
            print(f"user {name} unchanged")
            return 0
        st.update_user(
            name,
            password_hash=new_hash,
            domains=domains if "domains" in changed else None,
            admin=args.admin if "admin" in changed else None,
        )
    print(f"updated user {name}: {', '.join(changed)}")
    return 0


def user_remove(args: argparse.Namespace) -> int:
    """``fieldgate hub user remove --db DB NAME``."""
    with _storage(args) as st:
        if not st.remove_user(args.name):
            raise FieldgateError(f"there is no user {args.name!r:.70}")
    print(f"removed user {args.name}")
    return 0


def user_list(args: argparse.Namespace) -> int:
    """``fieldgate hub user list --db DB [--json]``."""
    with _storage(args) as st:
        users = st.users()
    if args.json:
        out = [
            {
                "name": u.name,
                "admin": u.admin,
                "domains": list(u.domains),
                "created_at": iso_utc(u.created_at),
                "updated_at": iso_utc(u.updated_at),
            }
            for u in users
        ]
        print(json.dumps(out, indent=2))
        return 0
    if not users:
        print("no users")
        return 0
    width = max(len(u.name) for u in users)
    for u in users:
        role = "admin" if u.admin else "user "
        print(f"{u.name:<{width}}  {role}  {', '.join(u.domains) or '-'}")
    return 0


def gateway_domain(args: argparse.Namespace) -> int:
    """``fieldgate hub gateway domain --db DB SERIAL DOMAIN``."""
    serial = _check_name("gateway serial", args.serial)
    domain = _check_name("domain", args.domain)
    with _storage(args) as st:
        before = st.set_domain(serial, domain)
    if before is None:
        print(f"gateway {serial} (not registered yet) is in domain {domain}")
    elif before == domain:
        print(f"gateway {serial} is in domain {domain} already")
    else:
        print(f"gateway {serial} moved from domain {before} to {domain}")
    return 0
