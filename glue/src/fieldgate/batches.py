"""Cutting readings into batch files and keeping files and store in agreement.

A batch is ``<serial>-<batch_id>.zip`` in ``upload.pending_dir`` (the format is
:mod:`fieldgate.batchfile`, docs/contract.md §6). Cutting one is crash-safe in this order:

1. read the oldest unbatched readings (ids above the watermark, at most
   ``upload.batch_max_rows``; :mod:`fieldgate.membership`);
2. write the zip to a hidden temporary name, fsync it, rename it atomically, fsync the dir;
3. in ONE transaction: insert the ``batches`` row with the readings' id range, which is
   what makes them this batch's (no write per reading), after deleting them when
   ``delete_reading_on_zip``.

A crash before 3 commits leaves at most a file without a row (an orphan, deleted by
:func:`recover` at the next start; the watermark did not move, so its readings are still
unbatched and are cut again).
A crash after leaves a complete batch. A row whose file went missing is regenerated from
its readings (same CSV, same sha256), which is why the readings are only deleted once the
file is durably on disk.

Batch ids sort in cutting order: ``<sequence:08d>-<UTC YYYYMMDDTHHMMSSZ>``; the sequence
comes from the store, so a clock that jumps back at boot cannot reorder batches.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import operator
import os
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from fieldgate import batchfile, fsutil, membership, store
from fieldgate.config import Config
from fieldgate.errors import FieldgateError

log = logging.getLogger("fieldgate.batches")

TMP_PREFIX = ".tmp-"
#: Environment seam for crash tests: the named step kills this process with SIGKILL.
CRASH_ENV = "FIELDGATE_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    """Die by SIGKILL at a named step when ``$FIELDGATE_TEST_CRASH_AT`` names it (tests only).

    This places a real, uncatchable kill exactly where a power cut or OOM kill would hurt
    most; production never sets the variable.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Batch:
    """One row of the ``batches`` table."""

    batch_id: str
    state: str
    rows: int
    sha256: str
    first_ts: int | None
    last_ts: int | None
    first_id: int | None
    last_id: int | None
    mode: str
    type: str
    file: str
    created_at: int

    def manifest(self, serial: str) -> dict[str, Any]:
        """The manifest sent to the hub and stored in the zip."""
        return batchfile.build_manifest(
            batch_id=self.batch_id,
            serial=serial,
            rows=self.rows,
            sha256=self.sha256,
            first_ts=self.first_ts,
            last_ts=self.last_ts,
            mode=self.mode,
            type=self.type,
            created_at=self.created_at,
            first_id=self.first_id,
            last_id=self.last_id,
        )


BATCH_COLUMNS = (
    "batch_id, state, rows, sha256, first_ts, last_ts, first_id, last_id, mode, type, file, "
    "created_at"
)


def ensure_dirs(cfg: Config) -> tuple[Path, Path]:
    """The pending and uploaded directories, created if missing."""
    dirs = []
    for key in ("pending_dir", "uploaded_dir"):
        d = Path(getattr(cfg.upload, key))
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FieldgateError(f"upload.{key}: cannot create {d}: {exc.strerror}") from None
        dirs.append(d)
    return dirs[0], dirs[1]


def write_zip(path: Path, csv_bytes: bytes, manifest: dict[str, Any]) -> None:
    """Write a batch zip durably under its hidden temporary name first (see recover)."""
    batchfile.write_zip(
        path,
        csv_bytes,
        manifest,
        tmp=path.with_name(TMP_PREFIX + path.name),
        midway=lambda: crash_point("writing_batch"),
    )


#: A reading's ts in a row of :func:`fieldgate.membership.readings_of`.
_TS = operator.itemgetter(1)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a batch's readings are read and
    rendered: they are a tuple per reading and its strings, which make no reference
    cycle, yet each batch of 50,000 would set off some 70 collections that only visit
    them (3-7 % of the read and render, docs/benchmarks.md). On again afterwards, unless
    it was off before (another thread's pause, or the program's choice)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _next_seq(conn: sqlite3.Connection) -> int:
    value = store.get_meta(conn, "last_batch_seq")
    return int(value) + 1 if value else 1


def _utc_stamp(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def cut_batch(conn: sqlite3.Connection, cfg: Config) -> Batch | None:
    """Cut the oldest unbatched readings into one batch; None when there is nothing to cut."""
    pending_dir, _ = ensure_dirs(cfg)
    above = membership.watermark(conn)
    ids = membership.next_range(conn, above, cfg.upload.batch_max_rows)
    if ids is None:
        return None
    first_id, last_id = ids
    # the same read as regenerate(): a regenerated file is this one, byte for byte
    with gc_paused():
        rows = membership.readings_of(conn, first_id, last_id)
        csv_bytes = batchfile.render_csv(rows)
    created_at = store.now_ms()
    batch_id = f"{_next_seq(conn):08d}-{_utc_stamp(created_at)}"
    batch = Batch(
        batch_id=batch_id,
        state="pending",
        rows=len(rows),
        sha256=batchfile.csv_sha256(csv_bytes),
        first_ts=min(map(_TS, rows), default=None),
        last_ts=max(map(_TS, rows), default=None),
        first_id=first_id,
        last_id=last_id,
        mode=cfg.upload.mode,
        type=cfg.upload.type,
        file=batchfile.file_name(cfg.site.serial, batch_id),
        created_at=created_at,
    )
    del rows
    path = pending_dir / batch.file
    write_zip(path, csv_bytes, batch.manifest(cfg.site.serial))
    crash_point("batch_file_written")
    try:
        _record(conn, cfg, batch, above)
    except _Raced as exc:
        # Another cutter recorded a batch between our read and our commit (a second
        # uploader); drop the file and let the next cut see the new truth.
        fsutil.unlink_durably(path)
        log.warning("batch %s discarded: %s; cutting again", batch_id, exc)
        return cut_batch(conn, cfg)
    except BaseException:
        fsutil.unlink_durably(path)
        raise
    return batch


def _record(conn: sqlite3.Connection, cfg: Config, batch: Batch, above: int) -> None:
    """In one transaction: insert the batch's row, which makes its id range its readings
    (:mod:`fieldgate.membership`), and delete them with ``delete_reading_on_zip``; _Raced
    if another cut moved the watermark from ``above`` since the readings were read."""
    with store.transaction(conn):
        now = membership.watermark(conn)
        if now != above:
            raise _Raced(f"another batch took the readings up to id {now}")
        if cfg.upload.delete_reading_on_zip:
            gone = membership.delete_readings_of(conn, batch.first_id, batch.last_id)
            if gone != batch.rows:
                raise _Raced(f"{gone} of its {batch.rows} readings were still there at commit")
        conn.execute(
            f"INSERT INTO batches ({BATCH_COLUMNS}) "  # noqa: S608 (a constant column list)
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            astuple(batch),
        )
        # its readings are batched now (status's backlog counter)
        conn.execute("UPDATE counts SET n = n - ? WHERE name = 'unbatched'", (batch.rows,))
        store.set_meta(conn, "last_batch_seq", str(int(batch.batch_id.split("-", 1)[0])))


class _Raced(Exception):
    pass


def cut_all(conn: sqlite3.Connection, cfg: Config, limit: int | None = None) -> list[Batch]:
    """Cut every unbatched reading into batches (at most ``limit`` batches)."""
    cut: list[Batch] = []
    while limit is None or len(cut) < limit:
        batch = cut_batch(conn, cfg)
        if batch is None:
            break
        log.info("cut batch %s: %d readings", batch.batch_id, batch.rows)
        cut.append(batch)
    return cut


def pending_batches(conn: sqlite3.Connection) -> list[Batch]:
    """Batches waiting for upload, oldest first."""
    return [
        Batch(*row)
        for row in conn.execute(
            f"SELECT {BATCH_COLUMNS} FROM batches "  # noqa: S608 (a constant column list)
            "WHERE state = 'pending' ORDER BY batch_id"
        )
    ]


def get_batch(conn: sqlite3.Connection, batch_id: str) -> Batch | None:
    row = conn.execute(
        f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = ?",  # noqa: S608
        (batch_id,),
    ).fetchone()
    return Batch(*row) if row else None


def move_file(src: Path, dst: Path) -> None:
    """Move a batch file (rename, or copy + fsync + rename + unlink across filesystems).

    No fsync of the rename: after a power cut the file is under one name or the other,
    and recover() puts a pending-dir file of an uploaded batch where it belongs.
    """
    fsutil.move_file(src, dst, tmp=dst.with_name(TMP_PREFIX + dst.name))


def regenerate(conn: sqlite3.Connection, cfg: Config, batch: Batch) -> bool:
    """Rewrite a pending batch's file from its readings; False if they are gone.

    The CSV is deterministic, so the sha256 normally matches the recorded one; if it does
    not (the readings were changed behind our back), the row is updated to the new truth.
    """
    pending_dir, _ = ensure_dirs(cfg)
    with gc_paused():
        rows = membership.readings_of(conn, batch.first_id, batch.last_id)
        if len(rows) != batch.rows:
            return False
        csv_bytes = batchfile.render_csv(rows)
    sha = batchfile.csv_sha256(csv_bytes)
    if sha != batch.sha256:
        log.warning("batch %s: regenerated CSV differs from the recorded one", batch.batch_id)
        with store.transaction(conn):
            conn.execute("UPDATE batches SET sha256 = ? WHERE batch_id = ?", (sha, batch.batch_id))
        batch = get_batch(conn, batch.batch_id) or batch
    write_zip(pending_dir / batch.file, csv_bytes, batch.manifest(cfg.site.serial))
    return True


def repair(conn: sqlite3.Connection, cfg: Config, batch: Batch) -> bool:
    """Make a pending batch's file exist again (regenerate, take back, or mark lost).

    Returns True when the file is there afterwards. Safe while a cutter runs: it only
    touches this batch.
    """
    pending_dir, uploaded_dir = ensure_dirs(cfg)
    if (pending_dir / batch.file).exists():
        return True
    if regenerate(conn, cfg, batch):
        log.warning("batch %s: file was missing; regenerated from the store", batch.batch_id)
        return True
    if (uploaded_dir / batch.file).exists():
        move_file(uploaded_dir / batch.file, pending_dir / batch.file)
        log.warning("batch %s: file taken back from %s", batch.batch_id, uploaded_dir)
        return True
    mark_lost(conn, batch, "its file is missing and its readings were deleted on zip")
    return False


def mark_lost(conn: sqlite3.Connection, batch: Batch, why: str) -> None:
    """A pending batch whose file and readings are both gone: say so, stop counting it."""
    msg = f"batch {batch.batch_id} ({batch.rows} readings) cannot be uploaded: {why}"
    log.error("%s", msg)
    with store.transaction(conn):
        conn.execute(
            "UPDATE batches SET state = 'lost', last_error = ? WHERE batch_id = ?",
            (why, batch.batch_id),
        )
        store.add_event(conn, "upload", msg)
        store.set_state(conn, "upload.last_error", msg)


def recover(conn: sqlite3.Connection, cfg: Config) -> None:
    """Bring the batch files and the ``batches`` table back into agreement after a crash.

    - temporary files of an interrupted write are deleted;
    - a zip without a row (crash before the commit) is an orphan: deleted, its readings are
      still unbatched and will be cut again;
    - a zip of an uploaded batch still in pending (crash after the mark) is moved on;
    - a pending row without its file is regenerated from its readings, or taken back from
      the uploaded directory, or marked ``lost`` when neither is possible.
    """
    pending_dir, _ = ensure_dirs(cfg)
    for path in sorted(pending_dir.iterdir()):
        if path.name.startswith(TMP_PREFIX):
            log.warning("removing %s left by an interrupted batch write", path)
            fsutil.unlink_durably(path)
            continue
        batch_id = batchfile.batch_id_of(path.name, cfg.site.serial)
        if batch_id is None:
            continue
        batch = get_batch(conn, batch_id)
        if batch is None:
            log.warning("removing orphan batch file %s (never recorded; readings re-cut)", path)
            fsutil.unlink_durably(path)
        elif batch.state == "uploaded":
            finish_file(cfg, batch)
    for batch in pending_batches(conn):
        repair(conn, cfg, batch)


def finish_file(cfg: Config, batch: Batch) -> None:
    """After upload: move the zip to the uploaded directory, or delete it if so configured."""
    pending_dir, uploaded_dir = ensure_dirs(cfg)
    src = pending_dir / batch.file
    if not src.exists():
        return
    if cfg.upload.delete_batch_on_upload:
        src.unlink()  # not fsynced: recover() deletes it again if a power cut undoes this
    else:
        move_file(src, uploaded_dir / batch.file)


def file_problem(cfg: Config, batch: Batch) -> str | None:
    """Why the batch's pending file does not match its row (unreadable, bad zip, other
    sha256, other batch), or None when it is sound."""
    pending_dir, _ = ensure_dirs(cfg)
    try:
        data, manifest = batchfile.read_zip(pending_dir / batch.file)
    except FileNotFoundError:
        return "the file is missing"
    except (OSError, batchfile.BatchFileError) as exc:
        return f"the file is damaged ({exc})"
    if batchfile.csv_sha256(data) != batch.sha256:
        return "readings.csv does not match the recorded sha256"
    if manifest.get("batch_id") != batch.batch_id:
        return "manifest.yaml does not name this batch"
    return None
