"""``fieldgate usb-watch``: the USB export daemon.

It takes the spooled events in order. For an added partition it examines the whole drive
it belongs to (all its partitions, or the drive itself when it has no partition table), one
drive at a time, so a drive inserted during an export waits:

1. LED ``in_progress``;
2. ``blkid`` names the filesystem; it is mounted ``nosuid,nodev,noexec`` on a private
   mount point under ``export.mount_dir`` (:mod:`fieldgate.usb.blockdev`);
3. ``Password.txt`` at the root must equal the export password (read without following
   symlinks, compared in constant time, never logged); a partition without it, or with
   the wrong one, does not qualify and the next partition is tried;
4. on the first qualifying partition: free space, snapshot, config, read-back from the
   drive's device, checksums (:func:`fieldgate.export.export_to`, the snapshot in a child
   process running as the store's owner, given the partition's device for FUSE drivers);
5. sync, unmount, LED ``success``; any failure: LED ``error`` and the cause in the log.

``success`` and ``error`` hold until the drive's remove event, then ``normal_operation``.
A remove event for the drive being exported aborts the export at once. Every step is one
line in ``export.log_file``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TextIO

from fieldgate import led as ledmod
from fieldgate import store
from fieldgate.config import Config
from fieldgate.daemon import StopFlag
from fieldgate.errors import FieldgateError
from fieldgate.export import describe_failure, export_to, record_result
from fieldgate.usb.blockdev import (
    DEV,
    MOUNT_OPTS,
    PASSWORD_FILE,
    SYS_BLOCK,
    NotQualified,
    detach_stale_mounts,
    drive_of,
    mount_partition,
    partitions_of,
    password_matches,
    prepare_mount_dir,
    probe_filesystem,
    read_password,
    unmount,
)
from fieldgate.usb.spool import Event, pending_events

log = logging.getLogger("fieldgate.usb")

POLL_SECS = 0.2


class ExportLog:
    """``export.log_file``: one timestamped line per step (and the same on stderr), rotated
    at ``max_bytes`` keeping ``backups`` older files (``usb_exporter.log.1`` ...), so it
    stays bounded on a gateway that runs for years. usb-watch is its only writer."""

    def __init__(self, path: str | Path, max_bytes: int = 0, backups: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._file = RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )

    def line(self, text: str) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        record = logging.makeLogRecord({"msg": f"{stamp} {text}"})
        if self._file.shouldRollover(record):
            self._file.doRollover()
        stream: TextIO = self._file.stream
        stream.write(f"{record.msg}\n")
        stream.flush()
        log.info("%s", text)

    def close(self) -> None:
        self._file.close()


class _Abort:
    """Stop an export when fieldgate stops or the drive's remove event arrives."""

    def __init__(self, stop: StopFlag, spool_dir: str, members: set[str]) -> None:
        self.stop = stop
        self.spool_dir = spool_dir
        self.members = members
        self.reason: str | None = None

    def is_set(self) -> bool:
        if self.stop.is_set():
            self.reason = "fieldgate is shutting down"
            return True
        for ev in pending_events(self.spool_dir):
            if isinstance(ev, Event) and ev.action == "remove" and ev.devname in self.members:
                self.reason = f"the drive was removed during the export ({ev.devname})"
                return True
        return False


class Watcher:
    """The state of ``usb-watch``: which drives hold a result, and the LED."""

    def __init__(
        self,
        cfg: Config,
        stop: StopFlag,
        *,
        sys_block: Path = SYS_BLOCK,
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.sys_block = sys_block
        self.mount_dir = Path(cfg.export.mount_dir)
        self.log = ExportLog(cfg.export.log_file, cfg.export.log_max_bytes, cfg.export.log_backups)
        self.led = ledmod.Led(
            cfg.export.led_path, publish=lambda state: publish_state(cfg, state), note=self.log.line
        )
        #: drive -> success|error, held until the drive is removed (insertion order)
        self.held: dict[str, str] = {}
        #: device name (partition or drive) -> drive, for remove events
        self.members: dict[str, str] = {}

    # -- lifecycle

    def start(self) -> None:
        """Prepare the mount directory, clean stale mounts of ours, LED normal."""
        self.log.line("usb-watch started")
        prepare_mount_dir(self.mount_dir, store_owner(self.cfg)[1])
        detach_stale_mounts(self.mount_dir, self.log.line)
        self.led.set(ledmod.NORMAL)

    def run(self) -> None:
        """Take events until stopped."""
        while not self.stop.is_set():
            for item in pending_events(self.cfg.export.spool_dir):
                if self.stop.is_set():
                    break
                if isinstance(item, Path):
                    self.log.line(f"unreadable event file {item.name} discarded")
                    item.unlink(missing_ok=True)
                    continue
                try:
                    self.handle(item)
                except Exception as exc:  # a bug must not stop the daemon on this event forever
                    log.exception("handling %s %s", item.action, item.devname)
                    self.log.line(f"{item.devname}: error: internal failure: {exc!r}")
                    self.led.set(ledmod.ERROR)
                item.path.unlink(missing_ok=True)
            self.stop.wait(POLL_SECS)
        self.log.line(f"usb-watch stopped ({self.stop.signal_name or 'stop'})")

    def handle(self, ev: Event) -> None:
        if ev.action == "add":
            self.added(ev.devname)
        else:
            self.removed(ev.devname)

    def show(self) -> None:
        """The LED shows the latest held result, or normal operation when none is held."""
        state = next(reversed(self.held.values())) if self.held else ledmod.NORMAL
        if state != self.led.state:
            self.led.set(state)

    def added(self, devname: str) -> None:
        if not (self.sys_block / devname).exists():
            self.log.line(f"{devname}: added, but gone before it could be examined")
            return
        drive = drive_of(devname, self.sys_block)
        if drive in self.held:
            self.log.line(f"{devname}: drive {drive} was examined already ({self.held[drive]})")
            return
        parts = partitions_of(drive, self.sys_block)
        for name in {drive, *parts}:
            self.members[name] = drive
        self.held[drive] = self.export_drive(drive, parts)
        self.show()

    def removed(self, devname: str) -> None:
        drive = self.members.get(devname)
        if drive is None:
            self.log.line(f"{devname}: removed (not a drive usb-watch holds)")
            return
        for name in [n for n, d in self.members.items() if d == drive]:
            del self.members[name]
        state = self.held.pop(drive, None)
        self.log.line(f"{drive}: drive removed (was {state})")
        self.show()

    # -- the export of one drive

    def export_drive(self, drive: str, parts: list[str]) -> str:
        """Examine the drive's partitions in order; export to the first that qualifies."""
        self.led.set(ledmod.IN_PROGRESS)
        self.log.line(f"{drive}: drive inserted, examining {', '.join(parts)}")
        reasons: list[str] = []
        members = {drive, *parts}
        for part in parts:
            try:
                target = export_partition(
                    self.cfg,
                    part,
                    self.mount_dir,
                    self.log.line,
                    _Abort(self.stop, self.cfg.export.spool_dir, members),
                )
            except NotQualified as exc:
                self.log.line(f"{part}: does not qualify: {exc}")
                reasons.append(f"{part}: {exc}")
                continue
            except (FieldgateError, OSError, subprocess.SubprocessError) as exc:
                cause = describe_failure(exc)
                self.log.line(f"{part}: error: {cause}")
                record_result(self.cfg, f"error: {part}: {cause}")
                self.led.set(ledmod.ERROR)
                return ledmod.ERROR
            self.log.line(f"{part}: success: export {target} written, drive may be removed")
            record_result(self.cfg, f"success: {part}: {target}")
            self.led.set(ledmod.SUCCESS)
            return ledmod.SUCCESS
        cause = "; ".join(reasons)
        self.log.line(f"{drive}: error: no partition qualifies ({cause})")
        record_result(self.cfg, f"error: {drive}: no partition qualifies ({cause})")
        self.led.set(ledmod.ERROR)
        return ledmod.ERROR


def export_partition(
    cfg: Config, part: str, mount_dir: Path, note: Callable[[str], None], abort: _Abort
) -> str:
    """Mount, check the password, export, unmount; returns the export's database name.

    NotQualified when the partition is not an export target; ``abort`` stops the export.
    """
    node = str(DEV / part)
    if not Path(node).exists():
        raise NotQualified(f"device node {node} does not exist")
    fstype = probe_filesystem(node)
    if fstype is None:
        raise NotQualified("no filesystem recognised")
    note(f"{part}: filesystem {fstype}")
    owner = store_owner(cfg)
    prepare_mount_dir(mount_dir, owner[1])  # the store (and its group) may have appeared since
    m = mount_partition(part, fstype, mount_dir, owner)
    note(f"{part}: mounted ({m.driver}, {MOUNT_OPTS}) on {m.point}")
    outcome: str | None = None
    try:
        given = read_password(m.point)
        if given is None:
            raise NotQualified(f"no {PASSWORD_FILE} at the root")
        if not password_matches(given, cfg.secret("export.password_file")):
            raise NotQualified(f"wrong password in {PASSWORD_FILE}")
        note(f"{part}: {PASSWORD_FILE} matches")
        if os.statvfs(m.point).f_flag & os.ST_RDONLY:
            raise FieldgateError("the filesystem is read-only (write-protected drive?)")
        result = export_to(
            cfg,
            m.point,
            note=lambda text: note(f"{part}: {text}"),
            isolate=True,
            stop=abort,
            device=m.node,
        )
        outcome = result.names.db
    finally:
        problem = unmount(m)
        note(f"{part}: synced and unmounted" + (f" ({problem})" if problem else ""))
    if problem and outcome is not None:
        raise FieldgateError(f"export written, but unmounting failed: {problem}")
    return outcome


def store_owner(cfg: Config) -> tuple[int, int]:
    """(uid, gid) of the store file; root's when there is no store yet."""
    try:
        st = Path(cfg.store.path).stat()
    except OSError:
        return (0, 0)
    return (st.st_uid, st.st_gid)


def publish_state(cfg: Config, state: str) -> None:
    """Publish ``export.state`` for ``status`` (never creates the store: this runs as root)."""
    path = Path(cfg.store.path)
    if not path.exists():
        return
    conn = store.connect(path, busy_timeout_ms=cfg.store.busy_timeout_ms)
    try:
        with store.transaction(conn):
            store.set_state(conn, "export.state", state)
    finally:
        conn.close()
