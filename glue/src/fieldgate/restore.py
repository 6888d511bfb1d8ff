"""Bring an exported database back: validate it, then load its readings into a store.

``fieldgate restore FILE.db --as-site SERIAL`` makes this gateway's store site SERIAL's and
loads the file's readings not yet batched, so the uploader sends them; ``--merge`` adds the
file's readings to the current store. The unique key (device, ts, metric) keeps every
reading single, however often a file is restored. ``fieldgate hub import`` uses the same
validation (:func:`inspect_export`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fieldgate import store
from fieldgate.config import Config
from fieldgate.errors import FieldgateError

log = logging.getLogger("fieldgate.restore")

SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class ExportInfo:
    """What validation learned about an exported database."""

    path: Path
    site_serial: str
    schema_version: int
    readings: int
    first_ts: int | None
    last_ts: int | None
    checksum_file: Path | None


def _ro_uri(path: Path) -> str:
    # immutable: nothing (not even a -wal or -shm file) is created next to the file
    return f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path) -> Path | None:
    """Verify FILE against a sha256sum-format file beside it that lists it, if there is one.

    Returns the checksum file used, or None when none beside the file mentions it.
    """
    for candidate in sorted(path.parent.glob("*.sha256")):
        try:
            lines = candidate.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            digest, _, name = line.strip().partition(" ")
            name = name.lstrip(" *")
            if name and Path(name).name == path.name and len(digest) == 64:
                if _sha256(path) != digest.lower():
                    raise FieldgateError(
                        f"{path}: checksum mismatch against {candidate.name}: the file is "
                        "damaged or was changed; copy it again from the drive"
                    )
                return candidate
    return None


def inspect_export(path: str | Path) -> ExportInfo:
    """Validate an exported fieldgate database; FieldgateError names what is wrong.

    Checks, in order: the file exists, is SQLite, passes ``PRAGMA integrity_check``, is a
    fieldgate store with a known (or migratable) schema version and a site serial, and
    matches the checksum file beside it when there is one.
    """
    path = Path(path)
    if not path.exists():
        raise FieldgateError(f"{path} does not exist")
    if not path.is_file():
        raise FieldgateError(f"{path} is not a file")
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise FieldgateError(f"cannot read {path}: {exc.strerror}") from None
    if header != SQLITE_MAGIC:
        raise FieldgateError(f"{path} is not an SQLite database")
    checksum_file = verify_checksum(path)
    try:
        conn = sqlite3.connect(_ro_uri(path), uri=True)
        try:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if result != ["ok"]:
                problems = [
                    line
                    for row in result
                    for line in str(row).splitlines()
                    if line.strip() and not line.startswith("***")
                ]
                first = problems[0] if problems else "failed"
                raise FieldgateError(
                    f"{path} is damaged (integrity check: {first}; {len(problems)} problems); "
                    "use another copy"
                )
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not {"readings", "meta"} <= tables:
                raise FieldgateError(f"{path} is an SQLite database but not a fieldgate store")
            version = store.schema_version(conn)
            if version == 0:
                raise FieldgateError(f"{path} is not a fieldgate store (no schema version)")
            if version > store.SCHEMA_VERSION:
                raise FieldgateError(
                    f"{path} has schema version {version}, newer than this fieldgate supports "
                    f"({store.SCHEMA_VERSION}); upgrade fieldgate on this machine first"
                )
            site = store.get_meta(conn, "site_serial")
            if not site:
                raise FieldgateError(f"{path} is a fieldgate store without a site serial")
            count, first, last = conn.execute(
                "SELECT COUNT(*), MIN(ts), MAX(ts) FROM readings"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        detail = " ".join(str(exc).split())
        raise FieldgateError(
            f"{path} is damaged or truncated ({detail}); use another copy"
        ) from None
    return ExportInfo(path, site, version, count, first, last, checksum_file)


@contextmanager
def readable_copy(info: ExportInfo) -> Iterator[Path]:
    """A path to a database at the current schema: the file itself, or a migrated copy."""
    if info.schema_version == store.SCHEMA_VERSION:
        yield info.path
        return
    with tempfile.TemporaryDirectory(prefix="fieldgate-restore-") as tmp:
        copy = Path(tmp) / info.path.name
        shutil.copyfile(info.path, copy)
        conn = store.connect(copy)
        store.migrate(conn, str(info.path))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        yield copy


def iter_readings(db: Path, batch_size: int = 10000) -> Iterator[list[tuple[str, int, str, float]]]:
    """The readings of a validated export, in id order, in lists of ``batch_size``."""
    conn = sqlite3.connect(_ro_uri(db), uri=True)
    try:
        cur = conn.execute("SELECT device, ts, metric, value FROM readings ORDER BY id")
        while rows := cur.fetchmany(batch_size):
            yield rows
    finally:
        conn.close()


@dataclass(frozen=True)
class RestoreResult:
    info: ExportInfo
    site: str
    new: int
    present: int


def _unuploaded(conn: sqlite3.Connection) -> int:
    unbatched = conn.execute("SELECT COUNT(*) FROM readings WHERE batch_id IS NULL").fetchone()[0]
    pending = conn.execute(
        "SELECT COALESCE(SUM(rows), 0) FROM batches WHERE state != 'uploaded'"
    ).fetchone()[0]
    return int(unbatched) + int(pending)


def _load(conn: sqlite3.Connection, db: Path, source: str) -> int:
    """INSERT OR IGNORE every reading of ``db`` (unbatched) in one transaction."""
    conn.execute("ATTACH DATABASE ? AS src", (_ro_uri(db),))
    try:
        with store.transaction(conn):
            before = conn.total_changes
            conn.execute(
                "INSERT OR IGNORE INTO readings (device, ts, metric, value, received_at, source) "
                "SELECT device, ts, metric, value, received_at, ? FROM src.readings ORDER BY id",
                (source,),
            )
            new = conn.total_changes - before
            store.add_event(conn, "restore", f"{new} new readings from {db.name}")
    finally:
        conn.execute("DETACH DATABASE src")
    return new


def _open_for_restore(cfg: Config) -> sqlite3.Connection:
    return store.open_store(cfg.store.path, busy_timeout_ms=cfg.store.busy_timeout_ms)


def restore_as_site(
    cfg: Config, file: str | Path, serial: str, *, force: bool = False
) -> RestoreResult:
    """Load an export into this gateway's store as site ``serial`` (readings unbatched)."""
    if cfg.site.serial != serial:
        raise FieldgateError(
            f"the configuration ({cfg.path}) says site.serial is {cfg.site.serial}; set it to "
            f"{serial} first (playbooks/restore.yml does this) so the gateway collects and "
            f"uploads as {serial}"
        )
    info = inspect_export(file)
    with readable_copy(info) as db:
        conn = _open_for_restore(cfg)
        try:
            current = store.get_meta(conn, "site_serial")
            count = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
            if current not in (None, serial) and count:
                raise FieldgateError(
                    f"store {cfg.store.path} holds {count} readings of site {current}; restoring "
                    f"as site {serial} would mix them: stop the glue and set that store aside "
                    "first (playbooks/restore.yml does both), or use --merge"
                )
            waiting = _unuploaded(conn)
            if waiting and not force:
                raise FieldgateError(
                    f"store {cfg.store.path} holds {waiting} readings not yet uploaded; let "
                    "'fieldgate upload --once' deliver them first, or pass --force to restore "
                    "anyway"
                )
            store.set_meta(conn, "site_serial", serial)
            new = _load(conn, db, f"restore:{info.path.name}")
        finally:
            conn.close()
    return RestoreResult(info, serial, new, info.readings - new)


def restore_merge(cfg: Config, file: str | Path) -> RestoreResult:
    """Add an export's readings to the current store; readings already present stay single."""
    info = inspect_export(file)
    with readable_copy(info) as db:
        conn = _open_for_restore(cfg)
        try:
            current = store.get_meta(conn, "site_serial")
            if current is None:
                store.set_meta(conn, "site_serial", cfg.site.serial)
            elif current != cfg.site.serial:
                raise FieldgateError(
                    f"store {cfg.store.path} belongs to site {current}, but the configuration "
                    f"says site.serial is {cfg.site.serial}; fix the configuration first"
                )
            new = _load(conn, db, f"restore:{info.path.name}")
        finally:
            conn.close()
    return RestoreResult(info, cfg.site.serial, new, info.readings - new)


def restore_cmd(cfg: Config, args: argparse.Namespace) -> int:
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
