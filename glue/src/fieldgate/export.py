"""A consistent export of the store and the site config into a directory (docs/contract.md §7).

Three files land in the target directory, ``<ts>`` being ``YYYYMMDDTHHMMSS+0000`` (UTC)::

    data_store-<serial>-<ts>.db      a snapshot of the store (plain SQLite, rollback journal)
    site_config-<serial>-<ts>.yaml   the configuration with every secret-bearing key removed
    export-<serial>-<ts>.sha256      ``sha256sum -c`` format, covering the two files above

How, and why this way:

- **Consistent while collection continues.** The snapshot is the store's database file
  itself, held still by a read transaction begun while the write-ahead log is wholly
  checkpointed (:class:`PinnedStore`, :func:`pin_store`): SQLite then writes nothing into
  the file until that transaction ends, and the collector's commits go on into the log.
  When another reader keeps part of the log from the file, SQLite's online backup in one
  step (``backup(pages=-1)``) from a read-only connection takes the snapshot instead (one
  read transaction; a stepped backup would restart on every commit and never finish).
- **Verified against what was written.** What can still go wrong is the bytes on the
  drive (a failing or fake-capacity stick, a FUSE driver's bug). The file is copied front
  to back (:func:`copy_pinned`) and compared, after the last write, with the file itself,
  still held still (:class:`fieldgate.copycheck.Copied`); with the backup, every write
  SQLite makes is observed on its way out (:mod:`fieldgate.teevfs`, a CRC-32 per page).
  The copy is synced and read back from the drive's device — not from the page cache
  (:func:`fieldgate.fsutil.read_from_device`; under a FUSE driver its block device's
  cache dropped too; under exfat-fuse from the copy's clusters on the block device
  itself, past the driver, when the filesystem's structures say with certainty where
  they are: :func:`device_chunks`). The SHA-256 in the checksum file is that of the bytes
  read back: for the file copy, that of the file held still, taken in a thread beside the
  copy and the sync, which the bytes read back then equal byte for byte.
  A cheap structural check (header, schema) runs on the copy; ``export.verify:
  quick_check | integrity_check`` adds that SQLite check of the snapshot while the
  drive syncs.
- **Drivers that need order.** fusefat corrupts files extended out of order, and SQLite
  writes page 1 last: the file copy is front to back anyway; for the backup the VFS
  writes the snapshot front to back (a write past the end of the file fills the gap with
  zeros first; page 1 then lands inside the file). Only where the VFS cannot be used is
  the backup taken beside the store and copied onto the drive front to back.
- **Nothing partial under a final name.** Everything is written inside a hidden staging
  directory ``.export-<serial>-<ts>.partial`` on the target itself (same filesystem, so the
  final step is a rename), synced, read back, and only then renamed into place; a failure
  removes the staging directory (best effort: on a drive that was pulled out nothing can
  be removed, but nothing carries a final name).
- **Never overwrite, never remove.** The staging directory is the reservation of a
  timestamp: ``mkdir`` is atomic, so two exports racing for one second cannot both get it,
  and a timestamp whose final names exist already is never used. When the current second
  is taken, the export waits for the next one; the names therefore keep exactly the
  format of docs/contract.md §7, and two exports in the same second get consecutive
  timestamps.
- **Space first.** The target must have room for the store and its WAL plus
  ``export.space_margin_percent``.
- **Least privilege.** When run as root for a store owned by another user (``usb-watch``),
  the snapshot and every write to the drive run in a forked child that has switched to the
  store file's owner and group; only the final renames run as root (the drive's root
  directory usually belongs to root). The block device under a FUSE filesystem is opened
  before the child drops root, and the child inherits the descriptor.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import os
import select
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fieldgate import store, teevfs
from fieldgate.config import Config, redacted
from fieldgate.copycheck import Copied, Written, check_bytes_on_device, check_on_device
from fieldgate.errors import FieldgateError
from fieldgate.fsutil import (
    Mount,
    drop_cached_pages,
    flush_block_device,
    free_bytes,
    fsync_dir,
    human_bytes,
    is_block_device,
    mount_of,
    read_extents,
    write_new,
)
from fieldgate.teevfs import TeeVfs
from fieldgate.usb import exfat

log = logging.getLogger("fieldgate.export")

TS_FORMAT = "%Y%m%dT%H%M%S+0000"
PARTIAL = ".partial"
#: Room for the configuration and checksum files beyond the database itself.
SMALL_FILES_BYTES = 1 << 20
#: SQLite's default upper limit for memory-mapped I/O (it falls back to read() if refused).
MMAP_BYTES = 0x7FFF0000
#: How many consecutive seconds are tried before giving up on a free name.
NAME_ATTEMPTS = 5

Note = Callable[[str], None]


def _no_note(_line: str) -> None:
    pass


@dataclass(frozen=True)
class ExportNames:
    """The file names of one export."""

    serial: str
    ts: str

    @property
    def db(self) -> str:
        return f"data_store-{self.serial}-{self.ts}.db"

    @property
    def config(self) -> str:
        return f"site_config-{self.serial}-{self.ts}.yaml"

    @property
    def checksum(self) -> str:
        return f"export-{self.serial}-{self.ts}.sha256"

    @property
    def staging(self) -> str:
        return f".export-{self.serial}-{self.ts}{PARTIAL}"

    @property
    def finals(self) -> tuple[str, str, str]:
        """In publishing order: the checksum file last, so it never names a missing file."""
        return (self.db, self.config, self.checksum)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    directory: Path
    names: ExportNames
    db_bytes: int
    db_sha256: str
    config_sha256: str

    @property
    def files(self) -> list[Path]:
        return [self.directory / n for n in self.names.finals]


def format_ts(epoch: float) -> str:
    """``YYYYMMDDTHHMMSS+0000`` for a UTC epoch in seconds."""
    return dt.datetime.fromtimestamp(int(epoch), tz=dt.UTC).strftime(TS_FORMAT)


def export_size(store_path: str | Path) -> int:
    """Bytes the snapshot can take at most: the database file plus its WAL."""
    path = Path(store_path)
    size = path.stat().st_size
    wal = Path(f"{path}-wal")
    if wal.exists():
        size += wal.stat().st_size
    return size


def required_space(store_path: str | Path, margin_percent: int) -> int:
    """Free bytes an export needs on the target: the export size plus the margin."""
    return math.ceil(export_size(store_path) * (1 + margin_percent / 100)) + SMALL_FILES_BYTES


def check_target(directory: Path, need: int, note: Note = _no_note) -> None:
    """Refuse a target that is not a writable directory with ``need`` bytes free."""
    if not directory.is_dir():
        raise FieldgateError(f"export target {directory} is not a directory")
    st = os.statvfs(directory)
    if st.f_flag & os.ST_RDONLY:
        raise FieldgateError(f"export target {directory} is on a read-only filesystem")
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise FieldgateError(
            f"not enough free space on {directory}: the export needs {human_bytes(need)} "
            f"(store, WAL and margin), {human_bytes(free)} free"
        )
    note(f"free space ok: need {human_bytes(need)}, {human_bytes(free)} free")


def _sleep_to_next_second(now: Callable[[], float], sleep: Callable[[float], None]) -> None:
    t = now()
    sleep(max(0.0, math.floor(t) + 1 - t) + 0.001)


def reserve_names(
    directory: Path,
    serial: str,
    *,
    now: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportNames:
    """Claim a timestamp in ``directory`` by creating its staging directory (atomic).

    A second whose staging directory or final files exist is skipped by waiting for the
    next one, so names never collide and keep the format of docs/contract.md §7.
    """
    for _ in range(NAME_ATTEMPTS):
        names = ExportNames(serial, format_ts(now()))
        try:
            (directory / names.staging).mkdir(mode=0o700)
        except FileExistsError:
            _sleep_to_next_second(now, sleep)
            continue
        if any(os.path.lexists(directory / n) for n in names.finals):
            (directory / names.staging).rmdir()
            _sleep_to_next_second(now, sleep)
            continue
        return names
    raise FieldgateError(
        f"no free export name in {directory}: exports of {serial} for {NAME_ATTEMPTS} "
        "consecutive seconds exist already (is the clock right?)"
    )


#: Filesystems that corrupt files written out of order (seen with fusefat 0.1a: a file
#: whose first cluster is written after later ones loses its chain).
SEQUENTIAL_ONLY = frozenset({"fuse.fusefat"})
#: Start writing the snapshot out to the drive every this many bytes, instead of leaving
#: it all to the final sync: the drive works while SQLite and the copy go on.
WRITEBACK_BYTES = 8 << 20
#: Bytes per write of the front-to-back copy.
COPY_CHUNK = 1 << 20

#: Test seams (tests only; production never sets them). ``PAUSE_ENV`` names a step at which
#: the export waits: it creates ``<$PAUSE_DIR_ENV>/<step>.paused`` and goes on once
#: ``<step>.resume`` exists there (at most ``PAUSE_MAX_SECS``). ``WRITE_ORDER_ENV`` set to
#: ``sqlite-order`` writes the snapshot in SQLite's own order even where the driver needs
#: it front to back (the damage fusefat then does must be found).
PAUSE_ENV = "FIELDGATE_TEST_PAUSE_AT"
PAUSE_DIR_ENV = "FIELDGATE_TEST_PAUSE_DIR"
PAUSE_MAX_SECS = 300
WRITE_ORDER_ENV = "FIELDGATE_TEST_WRITE_ORDER"


def pause_point(name: str) -> None:
    """Wait at a named step when ``$FIELDGATE_TEST_PAUSE_AT`` names it (see the seams above).

    The test does what it needs meanwhile (it damages the drive under the copy between
    the copy and its read-back); production never sets the variable.
    """
    if os.environ.get(PAUSE_ENV) != name:
        return
    where = Path(os.environ[PAUSE_DIR_ENV])
    (where / f"{name}.paused").touch()
    deadline = time.monotonic() + PAUSE_MAX_SECS
    while not (where / f"{name}.resume").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


class Writeback:
    """The path from an export's writes to the drive's device.

    ``device_fd``: the drive's block device, when a FUSE driver writes it through the
    device's page cache (the driver's writes are then flushed, and its reads made to
    come from the device, through that descriptor; see :mod:`fieldgate.fsutil`).
    """

    def __init__(self, path: Path, device_fd: int | None = None) -> None:
        self.path = path
        self.device_fd = device_fd
        self._fd: int | None = None
        self._started = 0

    def written(self, end: int) -> None:
        """The file is written up to ``end``: start writing it out every WRITEBACK_BYTES."""
        if end - self._started < WRITEBACK_BYTES:
            return
        self._started = end
        drop_cached_pages(self.device_fd if self.device_fd is not None else self.fd())

    def fd(self) -> int:
        """A descriptor of the file, for syncs and header writes."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
        return self._fd

    def sync(self) -> None:
        """fsync the file (a FUSE driver passes it on, or not: the device is synced later)."""
        os.fsync(self.fd())

    def flush_device(self) -> None:
        """After the last write: what a FUSE driver wrote is on the device, and the next
        reads through the driver come from the device."""
        if self.device_fd is not None:
            flush_block_device(self.device_fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def page_size_of(store_path: Path, busy_timeout_ms: int = 30000) -> int:
    """The page size of a database."""
    conn = store.connect(store_path, busy_timeout_ms=busy_timeout_ms, readonly=True)
    try:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


def backup(
    store_path: Path, dest: Path, *, busy_timeout_ms: int = 30000, vfs: TeeVfs | None = None
) -> None:
    """Copy the store into the new file ``dest`` in one step of SQLite's online backup.

    One read transaction on a read-only connection: in WAL mode it never blocks the
    collector's commits (a stepped backup would restart on every commit and never finish
    under load). With ``vfs``, ``dest`` is written through it (every write observed).
    """
    src = store.connect(store_path, busy_timeout_ms=busy_timeout_ms, readonly=True)
    try:
        src.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")  # fewer copies reading the store
        dst = store.connect_unjournaled(dest, vfs=vfs.name if vfs else None)
        try:
            src.backup(dst, pages=-1)
        finally:
            dst.close()
    except sqlite3.Error:
        if vfs is not None:
            vfs.raise_failure()  # what made SQLite fail, if it was the observer
        raise
    finally:
        src.close()
    if vfs is not None:
        vfs.raise_failure()


def rollback_journal_header(page: bytes) -> bytes:
    """A database's first page marked for rollback-journal mode (bytes 18/19 set to 1), so
    that the copy is one self-contained file a reader opens on read-only media."""
    if page[18:20] != b"\x02\x02":
        return page
    return page[:18] + b"\x01\x01" + page[20:]


def snapshot(store_path: Path, dest: Path, *, busy_timeout_ms: int = 30000) -> int:
    """A complete snapshot of the store in the new file ``dest`` (rollback-journal mode, not
    synced); returns its size."""
    backup(store_path, dest, busy_timeout_ms=busy_timeout_ms)
    fd = os.open(dest, os.O_RDWR)
    try:
        first = os.pread(fd, 100, 0)
        os.pwrite(fd, rollback_journal_header(first), 0)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def snapshot_onto(
    store_path: Path,
    dest: Path,
    writeback: Writeback,
    *,
    busy_timeout_ms: int = 30000,
    in_order: bool = False,
) -> Written:
    """SQLite's backup straight into ``dest`` on the drive, every write it makes observed
    (:mod:`fieldgate.teevfs`) and the drive kept busy; the header set to rollback-journal
    mode. ``in_order``: the file only grows front to back (for drivers that need it).
    Returns what was written."""
    written = Written(page_size_of(store_path, busy_timeout_ms))

    def observe(offset: int, data: memoryview) -> None:
        written.record(offset, data)
        writeback.written(offset + len(data))

    with TeeVfs(observe, in_order=in_order) as vfs:
        backup(store_path, dest, busy_timeout_ms=busy_timeout_ms, vfs=vfs)
    first = rollback_journal_header(written.first_page)
    if first != written.first_page:
        write_at(writeback.fd(), first, 0)
        written.record(0, first)
    return written


#: Tries at finding the store's write-ahead log wholly checkpointed (another reader can hold
#: part of it back for a while), and the pause after the n-th failed try (n times this).
PIN_ATTEMPTS = 5
PIN_PAUSE_SECS = 0.05


class PinnedStore:
    """The store's database file held still: the file alone is a consistent snapshot.

    In WAL mode SQLite writes the database file only in a checkpoint, and a checkpoint
    writes it only up to the oldest frame a reader still uses, never while a reader uses
    the file alone (``walCheckpoint`` in SQLite's ``wal.c``: ``mxSafeFrame``,
    ``WAL_READ_LOCK(0)``). So a read transaction begun while every frame of the log is
    checkpointed keeps the file's bytes as they are, and they are exactly that
    transaction's snapshot, until it ends (:func:`pin_store`). The collector's commits go
    on into the log meanwhile.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, pages: int, page_size: int) -> None:
        self.conn = conn
        self.page_size = page_size
        self.size = pages * page_size
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        if size != self.size:
            self.close()
            raise _NotPinned(f"the file holds {size} bytes, the snapshot {self.size}")

    def readinto(self, offset: int, buffer: bytearray) -> int:
        """Fill ``buffer`` with the snapshot's bytes at ``offset`` as the copy holds them (the
        header in rollback-journal mode); how many were read."""
        n = os.preadv(self.fd, [buffer], offset)
        if offset == 0 and n >= 20:
            buffer[18:20] = rollback_journal_header(bytes(buffer[:20]))[18:20]
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("ROLLBACK")
        self.conn.close()


class _NotPinned(Exception):
    """The store could not be held still (the reason)."""


def pin_store(store_path: Path, busy_timeout_ms: int) -> PinnedStore:
    """Hold the store's database file still for a copy (see :class:`PinnedStore`).

    Under the write lock (the collector waits for it as for any commit, at most the
    checkpoint of what its own checkpoints left: milliseconds), a passive checkpoint
    copies the log into the file; when it copied all of it, a read transaction begins
    before the write lock is let go. When another reader holds part of the log back, the
    write lock is let go and it is tried again a few times; _NotPinned says why not.
    """
    reader = store.connect(store_path, busy_timeout_ms=busy_timeout_ms)
    lock = store.connect(store_path, busy_timeout_ms=busy_timeout_ms)
    why = ""
    try:
        for attempt in range(1, PIN_ATTEMPTS + 1):
            lock.execute("BEGIN IMMEDIATE")
            try:
                busy, frames, done = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy == 0 and frames == done:
                    reader.execute("BEGIN")
                    reader.execute("SELECT count(*) FROM sqlite_schema").fetchone()
                    pages = int(reader.execute("PRAGMA page_count").fetchone()[0])
                    page_size = int(reader.execute("PRAGMA page_size").fetchone()[0])
                    try:
                        return PinnedStore(reader, store_path, pages, page_size)
                    except _NotPinned as exc:
                        why = str(exc)
                        break
                why = (
                    "a checkpoint runs elsewhere"
                    if busy
                    else f"another reader holds {frames - done} of {frames} frames of the log"
                )
            finally:
                lock.execute("ROLLBACK")
            if attempt < PIN_ATTEMPTS:
                time.sleep(PIN_PAUSE_SECS * attempt)
    except BaseException:
        reader.close()
        raise
    finally:
        lock.close()
    reader.close()
    raise _NotPinned(why)


def copy_pinned(
    pinned: PinnedStore, dest: Path, writeback: Writeback, *, sqlite_order: bool = False
) -> Copied:
    """Copy the pinned store file into the new file ``dest`` front to back in COPY_CHUNK
    writes, the header set to rollback-journal mode on the way; what was written. The
    writes are not hashed: the read-back compares the copy with the file, still held
    still; the file's SHA-256 is taken in a thread meanwhile (:meth:`Copied.hash_source`,
    reading the file again from the page cache), beside the copy and the sync, instead of
    in the read-back (0.25 CPU-s per 400 MiB that the read-back would wait for).

    ``sqlite_order`` (a test seam) writes the first chunk again halfway through, while the
    file still grows, as SQLite's backup rewrites page 1 (what fusefat cannot take).
    Writing out is started every WRITEBACK_BYTES on a kernel filesystem, but not under a
    FUSE driver: with its block device's cache dropped while it writes, exfat-fuse took
    2.96 s for 245 MiB, 0.52 s without (one export each; docs/benchmarks.md).
    """
    copied = Copied(pinned.page_size, pinned.readinto)
    buffer = bytearray(COPY_CHUNK)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    first: bytes | None = None
    copied.hash_source(pinned.size)
    try:
        offset = 0
        while offset < pinned.size:
            want = min(COPY_CHUNK, pinned.size - offset)
            if want < len(buffer):  # the last, shorter chunk
                buffer = bytearray(want)
            n = pinned.readinto(offset, buffer)
            if n != want:
                raise FieldgateError(
                    f"the store file ended at {offset + n} bytes during the copy, "
                    f"{pinned.size} expected"
                )
            write_at(fd, buffer, offset)
            copied.record(buffer)
            if sqlite_order and offset == 0:
                first = bytes(buffer)
            if first is not None and offset >= pinned.size // 2:
                write_at(fd, first, 0)
                first = None
            offset += n
            if writeback.device_fd is None:  # see the docstring
                writeback.written(offset)
    except BaseException:
        copied.close()
        raise
    finally:
        os.close(fd)
    return copied


def write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write every byte of ``data`` at ``offset``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_front_to_back(src: Path, dest: Path, writeback: Writeback, page_size: int) -> Written:
    """Copy ``src`` into the new file ``dest`` in order, front to back; what was written.

    For drivers that cannot take SQLite's write pattern (fusefat) where the observing VFS
    cannot be used (:func:`fieldgate.teevfs.available`).
    """
    written = Written(page_size)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with src.open("rb") as f:
            offset = 0
            for block in iter(lambda: f.read(COPY_CHUNK), b""):
                written.record(offset, block)
                write_at(fd, block, offset)
                offset += len(block)
                writeback.written(offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


VERIFY_PRAGMAS = ("integrity_check", "quick_check")


def integrity_check(db: Path, pragma: str = "integrity_check") -> None:
    """``PRAGMA integrity_check`` (or ``quick_check``) on a finished snapshot.

    FieldgateError naming the first problems when the snapshot is damaged.
    """
    if pragma not in VERIFY_PRAGMAS:
        raise ValueError(pragma)
    conn = store.connect(db, immutable=True)
    try:
        # Memory-mapped reads halve integrity_check's time (its index lookups re-read pages).
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        rows = [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}")]
    except sqlite3.DatabaseError as exc:
        if "I/O" in str(exc):  # the drive failed, the copy may be fine: say so
            raise
        raise FieldgateError(f"the snapshot failed {pragma}: {exc}") from None
    finally:
        conn.close()
    if rows != ["ok"]:
        first = " ".join(" ".join(rows).split())
        raise FieldgateError(f"the snapshot failed {pragma}: {first[:200]}")


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_header(written: Written) -> None:
    """The cheap structural check of a copy: its header says SQLite, rollback-journal mode,
    the page size written, and as many pages as were written. FieldgateError otherwise."""
    page = written.first_page
    size = int.from_bytes(page[16:18], "big") if len(page) >= 100 else 0
    if size == 1:
        size = 65536
    problem = None
    if page[:16] != SQLITE_MAGIC:
        problem = "no SQLite header"
    elif size != written.page_size:
        problem = f"page size {size} in the header, {written.page_size} written"
    elif page[18:20] != b"\x01\x01":
        problem = "not in rollback-journal mode"
    elif int.from_bytes(page[28:32], "big") * size != written.size:
        problem = f"{int.from_bytes(page[28:32], 'big')} pages in the header, {written.size} bytes"
    if problem:
        raise FieldgateError(f"the snapshot is not a whole database: {problem}")


def check_schema(db: Path) -> int:
    """Open the copy as SQLite would and read its schema (a few pages); its table count."""
    conn = store.connect(db, immutable=True)
    try:
        return int(conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        if "I/O" in str(exc):
            raise
        raise FieldgateError(f"the copy on the drive cannot be opened by SQLite: {exc}") from None
    finally:
        conn.close()


def side_by_side(main: Callable[[], None], *others: Callable[[], None]) -> None:
    """Run ``others`` in threads while ``main`` runs here; raise the first failure."""
    failure: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                failure.append(exc)

        return run

    workers = [threading.Thread(target=guarded(fn), name="export-side") for fn in others]
    for w in workers:
        w.start()
    try:
        main()
    finally:
        for w in workers:
            w.join()
    if failure:
        raise failure[0]


def config_text(cfg: Config, ts: str) -> str:
    """The site configuration with every secret removed, as YAML."""
    header = (
        f"# fieldgate site configuration of {cfg.site.serial}, exported {ts}.\n"
        "# Secret-bearing keys (passwords, keys, tokens) are removed.\n"
    )
    return header + yaml.safe_dump(redacted(cfg.raw), sort_keys=False)


def stage_export(
    cfg: Config,
    staging: Path,
    names: ExportNames,
    note: Note = _no_note,
    *,
    sequential: bool = False,
    in_order: bool = False,
    device_fd: int | None = None,
    device_path: tuple[str, ...] | None = None,
) -> dict:
    """Write, sync and verify the three files inside ``staging`` (``.partial`` names).

    1. The snapshot: the store file held still and copied (nothing hashed while writing:
       the read-back is compared with the file itself); when it cannot be held still,
       SQLite's backup straight onto the drive, each write observed (``in_order``: the
       file growing front to back, for drivers that corrupt files extended out of order;
       ``sequential``: taken beside the store and copied front to back, where the
       observing VFS cannot be used); ``export.verify`` may add a PRAGMA check of the
       snapshot, run while the drive syncs.
    2. The site config; then the drive's device is flushed (``device_fd``: see
       :class:`Writeback`).
    3. Both files read back from the device and compared with what was written; the
       SHA-256 is that of the bytes read back; the header and schema checked. Under a
       FUSE driver on exFAT the snapshot is read from its clusters on ``device_fd``
       (``device_path``: the staging directory's path in that filesystem), found in the
       filesystem's structures on the device (:func:`device_chunks`).
    4. The checksum file, synced and read back the same way.
    """
    if not os.access(staging, os.W_OK | os.X_OK):
        raise FieldgateError(
            f"{staging} cannot be written as uid {os.geteuid()} (the store's owner): a "
            "directory above it is not traversable for that user"
        )
    db_tmp = staging / (names.db + PARTIAL)
    store_path = Path(cfg.store.path)
    timeout = cfg.store.busy_timeout_ms
    pragma = cfg.export.verify if cfg.export.verify in VERIFY_PRAGMAS else None
    checked = f", {pragma} ok" if pragma else ""
    writeback = Writeback(db_tmp, device_fd)

    def sync_snapshot() -> None:
        """fsync the snapshot on the drive, ``export.verify``'s check beside it."""
        started = time.monotonic()
        side_by_side(writeback.sync, *([lambda: integrity_check(db_tmp, pragma)] if pragma else []))
        note(f"snapshot synced{checked} in {time.monotonic() - started:.2f} s")

    pinned: PinnedStore | None = None
    copied: Copied | None = None
    try:
        started = time.monotonic()
        try:
            pinned = pin_store(store_path, timeout)
        except (_NotPinned, sqlite3.Error) as exc:
            note(f"the store cannot be copied as a file ({exc}): SQLite's backup takes it")
        written: Written | Copied
        if pinned is not None:
            out_of_order = os.environ.get(WRITE_ORDER_ENV) == "sqlite-order"
            written = copied = copy_pinned(pinned, db_tmp, writeback, sqlite_order=out_of_order)
            how = " (page 1 rewritten halfway, as SQLite's backup does)" if out_of_order else ""
            note(
                f"snapshot copied{how}: {human_bytes(written.size)} "
                f"in {time.monotonic() - started:.2f} s"
            )
            sync_snapshot()
        elif sequential:
            local = store_path.with_name(f".{names.db}{PARTIAL}")
            try:
                snapshot(store_path, local, busy_timeout_ms=timeout)
                result: list[Written] = []
                side_by_side(
                    lambda: result.append(
                        copy_front_to_back(
                            local, db_tmp, writeback, page_size_of(store_path, timeout)
                        )
                    ),
                    *([lambda: integrity_check(local, pragma)] if pragma else []),
                )
                written = result[0]
            finally:
                local.unlink(missing_ok=True)
            note(
                f"snapshot taken beside the store and copied front to back, synced{checked}: "
                f"{human_bytes(written.size)} in {time.monotonic() - started:.2f} s"
            )
        else:
            written = snapshot_onto(
                store_path, db_tmp, writeback, busy_timeout_ms=timeout, in_order=in_order
            )
            how = " front to back" if in_order else ""
            note(
                f"snapshot written{how}: {human_bytes(written.size)} "
                f"in {time.monotonic() - started:.2f} s"
            )
            sync_snapshot()
        check_header(written)
        cfg_tmp = staging / (names.config + PARTIAL)
        data = config_text(cfg, names.ts).encode()
        write_new(cfg_tmp, data)
        writeback.flush_device()
        pause_point("export-readback")
        started = time.monotonic()
        chunks = None
        if device_fd is not None and device_path is not None:
            chunks = device_chunks(device_fd, (*device_path, db_tmp.name), written, note)
        db_sha = check_on_device(db_tmp, written, chunks)
        check_bytes_on_device(cfg_tmp, data)
        tables = check_schema(db_tmp)
        note(
            f"snapshot and site config read back from the drive and compared with what was "
            f"written ({tables} tables) in {time.monotonic() - started:.2f} s; sha256 {db_sha}"
        )
        cfg_sha = hashlib.sha256(data).hexdigest()
        sums = f"{db_sha}  {names.db}\n{cfg_sha}  {names.config}\n".encode()
        sums_tmp = staging / (names.checksum + PARTIAL)
        write_new(sums_tmp, sums)
        fsync_dir(staging)
        writeback.flush_device()
        check_bytes_on_device(sums_tmp, sums)
        note("checksum file written, synced and read back")
    finally:
        writeback.close()
        if copied is not None:
            copied.close()  # its hashing reads the store file: stopped before it is let go
        if pinned is not None:
            pinned.close()
    return {"db_bytes": written.size, "db_sha256": db_sha, "config_sha256": cfg_sha}


def device_chunks(
    device_fd: int, path: tuple[str, ...], written: Written | Copied, note: Note = _no_note
) -> Iterator[memoryview] | None:
    """The copy's bytes read straight from its clusters on an exFAT drive's block device,
    past the FUSE driver (which reads at its own speed); None when its place is not
    certain (not exFAT, a structure that does not check out, a length other than the one
    written: :mod:`fieldgate.usb.exfat`): the copy is then read back through the driver.
    Either is noted. Called after :meth:`Writeback.flush_device`: the driver's fsync wrote
    the directory entries, and the device's cache is dropped."""
    started = time.monotonic()
    try:
        extents = exfat.file_extents(device_fd, list(path), written.size)
    except (exfat.NotMapped, OSError) as exc:
        note(f"the snapshot is read back through the driver ({exc})")
        return None
    pieces = "one extent" if len(extents) == 1 else f"{len(extents)} extents"
    note(
        f"snapshot found in the exFAT structures on the device ({pieces}) in "
        f"{time.monotonic() - started:.2f} s: read back from there, past the driver"
    )
    return read_extents(device_fd, extents)


def fs_path(directory: Path, mount: Mount | None) -> tuple[str, ...] | None:
    """The path of ``directory`` inside the filesystem mounted at ``mount`` (None: unknown)."""
    if mount is None:
        return None
    try:
        inside = directory.resolve().relative_to(mount.point)
    except ValueError:
        return None
    return (*Path(mount.root).parts[1:], *inside.parts)


def publish(staging: Path, directory: Path, names: ExportNames) -> None:
    """Rename the staged files to their final names (never over an existing file)."""
    done: list[str] = []
    try:
        for name in names.finals:
            final = directory / name
            if os.path.lexists(final):
                raise FieldgateError(f"{final} appeared during the export; it was left alone")
            (staging / (name + PARTIAL)).rename(final)
            done.append(name)
        fsync_dir(directory)
    except BaseException:
        for name in done:  # put our own files back out of sight; the caller removes them
            with contextlib.suppress(OSError):
                (directory / name).rename(staging / (name + PARTIAL))
        raise
    staging.rmdir()


def discard(staging: Path, note: Note = _no_note) -> None:
    """Remove a staging directory and what this export put in it (best effort)."""
    try:
        entries = list(staging.iterdir())
    except FileNotFoundError:
        return
    except OSError as exc:
        note(f"cannot clean up {staging.name}: {exc.strerror or exc}")
        return
    try:
        for entry in entries:
            entry.unlink()
        staging.rmdir()
    except OSError as exc:
        note(f"cannot clean up {staging.name}: {exc.strerror or exc}")


def describe_failure(exc: BaseException, target: Path | None = None) -> str:
    """One sentence for a failure while handling a drive or writing an export.

    With ``target`` (the directory being written), I/O and SQLite failures are worded as
    failures of writing there (full, read-only, device gone); without it, as the operation
    that failed (a command that timed out, a file that could not be opened).
    """
    if isinstance(exc, FieldgateError):
        return str(exc)
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"{exc.cmd[0]} did not finish within {exc.timeout:.0f} s"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        if target is None:
            return f"{where}{exc.strerror or exc}"
        if exc.errno == errno.ENOSPC:
            return f"the target {target} is full"
        if exc.errno == errno.EROFS:
            return f"the target {target} is read-only"
        if exc.errno in (errno.EIO, errno.ENOTCONN, errno.ENODEV, errno.ENXIO):
            return f"I/O error writing to {target} (device removed or failing): {exc.strerror}"
        return f"writing the export failed: {where}{exc.strerror or exc}"
    if target is None:
        return str(exc)
    if isinstance(exc, sqlite3.Error):
        text = str(exc)
        if "disk I/O error" in text:
            return f"I/O error writing to {target} (device removed or failing): {text}"
        if "full" in text:
            return f"the target {target} is full: {text}"
        return f"the snapshot failed: {text}"
    return f"the export failed: {type(exc).__name__}: {exc}"


def store_owner(store_path: str | Path) -> tuple[int, int]:
    """(uid, gid) owning the store file."""
    st = Path(store_path).stat()
    return st.st_uid, st.st_gid


def run_isolated(
    fn: Callable[[], dict],
    *,
    uid: int | None = None,
    gid: int | None = None,
    stop: Any = None,
) -> dict:
    """Run ``fn`` in a forked child (as ``uid``/``gid`` when given); return its result.

    A FieldgateError or any other failure in the child comes back as a FieldgateError with
    the same sentence. When ``stop`` (a StopFlag) is set, the child is killed.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(rfd)
        code = 1
        result: dict[str, Any]
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if uid is not None and gid is not None:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            result = {"ok": fn()}
            code = 0
        except BaseException as exc:
            result = {"error": str(exc) if isinstance(exc, FieldgateError) else None}
            result["exc"] = _pack_exc(exc)
        try:
            os.write(wfd, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    killed = False
    try:
        while True:
            ready, _, _ = select.select([rfd], [], [], 0.2)
            if ready:
                block = os.read(rfd, 65536)
                if not block:
                    break
                chunks.append(block)
            elif stop is not None and stop.is_set() and not killed:
                os.kill(pid, signal.SIGKILL)
                killed = True
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if killed:
        reason = getattr(stop, "reason", None) or "fieldgate is shutting down"
        raise FieldgateError(f"the export was stopped: {reason}")
    try:
        result = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        result = {}
    if "ok" in result:
        return result["ok"]
    if result.get("error"):
        raise FieldgateError(result["error"])
    if "exc" in result:
        raise _unpack_exc(result["exc"])
    raise FieldgateError(f"the export process ended abnormally (wait status {status})")


def _pack_exc(exc: BaseException) -> dict:
    if isinstance(exc, OSError):
        return {"kind": "os", "errno": exc.errno, "strerror": exc.strerror, "file": exc.filename}
    if isinstance(exc, sqlite3.Error):
        return {"kind": "sqlite", "text": str(exc)}
    return {"kind": "other", "text": f"{type(exc).__name__}: {exc}"}


def _unpack_exc(data: dict) -> BaseException:
    if data.get("kind") == "os":
        return OSError(data.get("errno"), data.get("strerror"), data.get("file"))
    if data.get("kind") == "sqlite":
        return sqlite3.OperationalError(data.get("text"))
    return FieldgateError(f"the export failed: {data.get('text')}")


def export_to(
    cfg: Config,
    directory: str | Path,
    *,
    note: Note = _no_note,
    isolate: bool | None = None,
    stop: Any = None,
    device: str | None = None,
) -> ExportResult:
    """Export the store and site configuration into ``directory`` (see the module doc).

    ``isolate`` runs the snapshot in a forked child (default: only when root exports a
    store that belongs to another user, and then as that user). ``device``: the block
    device under ``directory``, for a FUSE filesystem (default: the mount's source when it
    is one); opened here, before the child drops root. Raises FieldgateError with one
    sentence naming the cause; nothing is left under a final name on failure.
    """
    directory = Path(directory)
    store_path = Path(cfg.store.path)
    if not store_path.exists():
        raise FieldgateError(f"store {store_path} does not exist: nothing to export yet")
    need = required_space(store_path, cfg.export.space_margin_percent)
    check_target(directory, need, note)
    uid, gid = store_owner(store_path)
    drop = os.geteuid() == 0 and uid != 0
    if isolate is None:
        isolate = drop
    mount = mount_of(directory)
    fstype = mount.fstype if mount else ""
    # without the observing VFS: a snapshot beside the store, copied front to back
    sequential = not teevfs.available()
    in_order = fstype in SEQUENTIAL_ONLY and os.environ.get(WRITE_ORDER_ENV) != "sqlite-order"
    if sequential:
        local_need = export_size(store_path) + SMALL_FILES_BYTES
        if free_bytes(store_path.parent) < local_need:
            raise FieldgateError(
                f"the target needs a front-to-back copy, but {store_path.parent} lacks "
                f"{human_bytes(local_need)} for the temporary snapshot"
            )
    device_fd = None
    device_path = None
    if fstype.startswith("fuse"):
        device_fd = open_device(device or (mount.source if mount else ""), fstype, note)
        device_path = fs_path(directory, mount)
    names = reserve_names(directory, cfg.site.serial)
    staging = directory / names.staging
    note(f"writing export {names.ts} into {directory}")

    def stage() -> dict:
        return stage_export(
            cfg,
            staging,
            names,
            note,
            sequential=sequential,
            in_order=in_order,
            device_fd=device_fd,
            device_path=(*device_path, names.staging) if device_path is not None else None,
        )

    try:
        if drop:
            _hand_over(staging, uid, gid)
            note(f"snapshot runs as uid {uid} gid {gid} (the store's owner)")
        if isolate:
            info = run_isolated(
                stage, uid=uid if drop else None, gid=gid if drop else None, stop=stop
            )
        else:
            info = stage()
        publish(staging, directory, names)
    except BaseException as exc:
        discard(staging, note)
        if isinstance(exc, FieldgateError | OSError | sqlite3.Error):
            raise FieldgateError(describe_failure(exc, directory)) from None
        raise
    finally:
        if device_fd is not None:
            os.close(device_fd)
    note("files renamed into place: " + ", ".join(names.finals))
    return ExportResult(
        directory=directory,
        names=names,
        db_bytes=info["db_bytes"],
        db_sha256=info["db_sha256"],
        config_sha256=info["config_sha256"],
    )


def open_device(node: str, fstype: str, note: Note = _no_note) -> int | None:
    """A descriptor of the block device under a FUSE filesystem, or None (noted) when it is
    unknown or cannot be opened: the read-back then cannot bypass the device's cache."""
    if node and is_block_device(node):
        try:
            return os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            note(
                f"cannot open {node} under {fstype} ({exc.strerror}): the read-back may come "
                "from its cache"
            )
            return None
    note(f"the block device under {fstype} is unknown: the read-back may come from its cache")
    return None


def _hand_over(staging: Path, uid: int, gid: int) -> None:
    """Let the store's owner write the staging directory (ext4: chown; FUSE: uid= option)."""
    try:
        os.chown(staging, uid, gid)
    except OSError:
        st = staging.stat()
        if st.st_uid != uid:
            raise
    st = staging.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise FieldgateError(f"{staging} is not a directory")


def record_result(cfg: Config, text: str) -> None:
    """Publish ``export.last_result`` and an ``export`` event, if the store exists."""
    path = Path(cfg.store.path)
    if not path.exists():
        return
    try:
        conn = store.connect(path, busy_timeout_ms=cfg.store.busy_timeout_ms)
        try:
            with store.transaction(conn):
                store.set_state(conn, "export.last_result", text)
                store.add_event(conn, "export", text)
        finally:
            conn.close()
    except sqlite3.Error:
        pass


def export_to_dir(cfg: Config, target: Path) -> ExportResult:
    """``fieldgate export --to DIR``: export into an existing directory and record the result
    (``export.last_result`` and an event) for ``status``."""
    if not target.is_dir():
        raise FieldgateError(f"export target {target} is not a directory (create it first)")
    try:
        result = export_to(cfg, target, note=log.info)
    except FieldgateError as exc:
        record_result(cfg, f"error: export to {target}: {exc}")
        raise
    record_result(cfg, f"success: export to {target}: {result.names.db}")
    return result
