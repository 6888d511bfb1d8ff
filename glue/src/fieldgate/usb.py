"""USB export: ``fieldgate usb-event`` (run by udev) and ``fieldgate usb-watch`` (daemon).

udev runs ``usb-event add|remove DEVNAME`` for every USB block partition. A udev RUN
program must be short-lived and may not mount, so it only drops one small file per event
into ``export.spool_dir`` (written under a temporary name and renamed: atomic) and exits.

``usb-watch`` (supervisor, root) takes the events in order. For an added partition it
examines the whole drive it belongs to (all its partitions, or the drive itself when it has
no partition table), one drive at a time, so a drive inserted during an export waits:

1. LED ``in_progress``;
2. ``blkid`` names the filesystem; ext2/3/4 are mounted by the kernel, vfat and exFAT by the
   kernel when it has them, else by FUSE (``fusefat -o rw+``, ``mount.exfat-fuse``); always
   ``nosuid,nodev,noexec`` on a private mount point under ``export.mount_dir``;
3. ``Password.txt`` at the root must equal the export password (read without following
   symlinks, compared in constant time, never logged); a partition without it, or with
   the wrong one, does not qualify and the next partition is tried;
4. on the first qualifying partition: free space, snapshot, config, checksums
   (:func:`fieldgate.export.export_to`, the snapshot in a child process running as the
   store's owner);
5. sync, unmount, LED ``success``; any failure: LED ``error`` and the cause in the log.

``success`` and ``error`` hold until the drive's remove event, then ``normal_operation``.
A remove event for the drive being exported aborts the export at once. Every step is one
line in ``export.log_file``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import hmac
import json
import logging
import os
import re
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fieldgate import fsutil, store
from fieldgate import led as ledmod
from fieldgate.config import Config
from fieldgate.daemon import StopFlag
from fieldgate.errors import FieldgateError
from fieldgate.export import describe_failure, export_to, record_result
from fieldgate.fsutil import is_mounted, mount_points

log = logging.getLogger("fieldgate.usb")

DEVNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")
SYS_BLOCK = Path("/sys/class/block")
DEV = Path("/dev")
PASSWORD_FILE = "Password.txt"  # noqa: S105 (a file name)
PASSWORD_MAX_BYTES = 4096
MOUNT_OPTS = "nosuid,nodev,noexec"
POLL_SECS = 0.2
MOUNT_WAIT_SECS = 15.0
FUSE_EXIT_WAIT_SECS = 120.0


class NotQualified(FieldgateError):
    """A partition that is not an export target (no filesystem, no or wrong password)."""


# --------------------------------------------------------------------------- events


def normalize_devname(name: str) -> str:
    """``/dev/sdb1`` or ``sdb1`` -> ``sdb1``; anything else is refused."""
    text = name.strip()
    if text.startswith("/dev/"):
        text = text[len("/dev/") :]
    if not DEVNAME_RE.match(text):
        raise FieldgateError(f"{name!r} is not a block device name (expected e.g. sdb1)")
    return text


@dataclass(frozen=True)
class Event:
    """One recorded device event."""

    path: Path
    action: str
    devname: str


def record_event(spool_dir: str | Path, action: str, devname: str) -> Path:
    """Drop one event into the spool atomically (temporary name, then rename)."""
    if action not in ("add", "remove"):
        raise FieldgateError(f"unknown device action {action!r} (add or remove)")
    spool = Path(spool_dir)
    try:
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FieldgateError(f"cannot create spool directory {spool}: {exc.strerror}") from None
    name = f"{time.time_ns():020d}-{os.getpid():07d}.event"
    body = json.dumps({"action": action, "devname": devname, "at_ns": time.time_ns()})
    try:
        fsutil.atomic_write(spool / name, (body + "\n").encode(), tmp=spool / f".{name}.tmp")
    except OSError as exc:
        raise FieldgateError(f"cannot record the event in {spool}: {exc.strerror}") from None
    return spool / name


def pending_events(spool_dir: str | Path) -> list[Event | Path]:
    """Recorded events, oldest first; an unreadable event file is returned as its path."""
    spool = Path(spool_dir)
    try:
        names = sorted(p.name for p in spool.iterdir() if p.name.endswith(".event"))
    except FileNotFoundError:
        return []
    out: list[Event | Path] = []
    for name in names:
        path = spool / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            out.append(Event(path, str(data["action"]), normalize_devname(str(data["devname"]))))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError, FieldgateError):
            out.append(path)
    return out


def event_cmd(cfg: Config, args: argparse.Namespace) -> int:
    """``fieldgate usb-event add|remove DEVNAME``: record the event and return at once."""
    record_event(cfg.export.spool_dir, args.action, normalize_devname(args.devname))
    return 0


# --------------------------------------------------------------------------- block devices


def drive_of(devname: str, sys_block: Path = SYS_BLOCK) -> str:
    """The whole drive a partition belongs to (a drive is its own drive)."""
    entry = sys_block / devname
    if (entry / "partition").is_file():
        return entry.resolve().parent.name
    return devname


def partitions_of(drive: str, sys_block: Path = SYS_BLOCK) -> list[str]:
    """The drive's partitions in partition-number order, or the drive itself if none."""
    base = (sys_block / drive).resolve()
    parts: list[tuple[int, str]] = []
    with contextlib.suppress(OSError):
        for child in base.iterdir():
            number = child / "partition"
            if number.is_file():
                try:
                    parts.append((int(number.read_text().strip()), child.name))
                except (OSError, ValueError):
                    continue
    return [name for _, name in sorted(parts)] or [drive]


def probe_filesystem(node: str) -> str | None:
    """The filesystem type on a block device per ``blkid -p`` (None: nothing recognised)."""
    p = subprocess.run(
        ["blkid", "-p", "-o", "export", node], capture_output=True, text=True, check=False
    )
    if p.returncode != 0:
        return None
    fields = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    if fields.get("USAGE", "filesystem") != "filesystem":
        return None
    return fields.get("TYPE")


def kernel_has(fstype: str) -> bool:
    """Whether the running kernel mounts ``fstype`` itself (/proc/filesystems)."""
    try:
        text = Path("/proc/filesystems").read_text(encoding="ascii")
    except OSError:
        return False
    return any(line.split()[-1] == fstype for line in text.splitlines() if line.strip())


@dataclass
class Mounted:
    """A partition mounted for an export."""

    devname: str
    node: str
    fstype: str
    driver: str
    point: Path
    fuse: subprocess.Popen[bytes] | None = None


def _run(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if p.returncode != 0:
        detail = (p.stderr or p.stdout).strip().splitlines()
        raise FieldgateError(f"{what} failed: {detail[-1] if detail else f'exit {p.returncode}'}")


def mount_partition(devname: str, fstype: str, mount_dir: Path, owner: tuple[int, int]) -> Mounted:
    """Mount ``/dev/<devname>`` on a fresh private directory under ``mount_dir``."""
    node = str(DEV / devname)
    uid, gid = owner
    point = Path(tempfile.mkdtemp(prefix=f"{devname}-", dir=mount_dir))
    owned = f"uid={uid},gid={gid},umask=077"
    fuse_opts = f"{MOUNT_OPTS},allow_other,default_permissions,{owned}"
    m = Mounted(devname, node, fstype, "kernel", point)
    try:
        if fstype in ("ext2", "ext3", "ext4"):
            _run(["mount", "-t", fstype, "-o", MOUNT_OPTS, node, str(point)], "mount")
        elif fstype in ("vfat", "exfat") and kernel_has(fstype):
            _run(["mount", "-t", fstype, "-o", f"{MOUNT_OPTS},{owned}", node, str(point)], "mount")
        elif fstype == "vfat":
            m.driver = "fusefat"
            # -f keeps fusefat in the foreground as our child: after umount we wait for it
            # to exit, which is when it has written everything to the device.
            m.fuse = subprocess.Popen(
                ["fusefat", "-f", "-o", f"rw+,{fuse_opts}", node, str(point)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait_mounted(m)
        elif fstype == "exfat":
            m.driver = "exfat-fuse"
            # A fuseblk mount: umount waits for the daemon to flush and finish.
            _run(["mount.exfat-fuse", "-o", fuse_opts, node, str(point)], "mount.exfat-fuse")
        else:
            raise NotQualified(f"filesystem {fstype} is not supported (ext2/3/4, vfat, exfat)")
        if m.driver != "kernel":
            # FUSE drivers may drop per-mount flags; enforce them on the mount point itself.
            _run(["mount", "-o", f"remount,bind,{MOUNT_OPTS}", str(point)], "remount")
    except BaseException:
        _abandon(m)
        raise
    return m


def _wait_mounted(m: Mounted) -> None:
    deadline = time.monotonic() + MOUNT_WAIT_SECS
    while time.monotonic() < deadline:
        if is_mounted(m.point):
            return
        if m.fuse is not None and m.fuse.poll() is not None:
            raise FieldgateError(f"{m.driver} could not mount {m.node} (exit {m.fuse.returncode})")
        time.sleep(0.05)
    raise FieldgateError(f"{m.driver} did not mount {m.node} within {MOUNT_WAIT_SECS:.0f} s")


def _abandon(m: Mounted) -> None:
    if is_mounted(m.point):
        subprocess.run(["umount", "-l", str(m.point)], capture_output=True, check=False)
    if m.fuse is not None and m.fuse.poll() is None:
        m.fuse.kill()
        m.fuse.wait()
    with contextlib.suppress(OSError):
        m.point.rmdir()


def unmount(m: Mounted) -> str | None:
    """Sync and unmount; None when clean, else what went wrong (the mount is gone anyway)."""
    problem: str | None = None
    os.sync()
    p = subprocess.run(["umount", str(m.point)], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        problem = f"umount failed ({p.stderr.strip() or p.returncode}); detached lazily"
        subprocess.run(["umount", "-l", str(m.point)], capture_output=True, check=False)
    if m.fuse is not None:
        try:
            m.fuse.wait(FUSE_EXIT_WAIT_SECS)
        except subprocess.TimeoutExpired:
            m.fuse.kill()
            m.fuse.wait()
            problem = problem or f"{m.driver} did not finish writing within the time limit"
        if m.fuse.returncode not in (0, None) and problem is None:
            problem = f"{m.driver} ended with exit status {m.fuse.returncode}"
    # Push the block device's own buffers out; harmless when the device is gone.
    subprocess.run(["blockdev", "--flushbufs", m.node], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        m.point.rmdir()
    return problem


def read_password(root: Path) -> str | None:
    """The stripped content of ``Password.txt`` at ``root`` (None when there is none).

    Opened without following symlinks and only if it is a regular file, so a prepared
    drive cannot make root read anything else; FAT's case-insensitivity is honoured.
    """
    path = root / PASSWORD_FILE
    if not os.path.lexists(path):
        with contextlib.suppress(OSError):
            for entry in root.iterdir():
                if entry.name.lower() == PASSWORD_FILE.lower():
                    path = entry
                    break
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotQualified(f"{PASSWORD_FILE} is a symbolic link") from None
        raise NotQualified(f"cannot read {PASSWORD_FILE}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotQualified(f"{PASSWORD_FILE} is not a regular file")
        data = os.read(fd, PASSWORD_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > PASSWORD_MAX_BYTES:
        return ""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return ""


def password_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of two passwords."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# --------------------------------------------------------------------------- the daemon


class ExportLog:
    """``export.log_file``: one timestamped line per step (and the same on stderr)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._file: TextIO = self.path.open("a", encoding="utf-8")

    def line(self, text: str) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._file.write(f"{stamp} {text}\n")
        self._file.flush()
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
        self.log = ExportLog(cfg.export.log_file)
        self.led = ledmod.Led(cfg.export.led_path, publish=self._publish, note=self.log.line)
        #: drive -> success|error, held until the drive is removed (insertion order)
        self.held: dict[str, str] = {}
        #: device name (partition or drive) -> drive, for remove events
        self.members: dict[str, str] = {}

    # -- store facts

    def _publish(self, state: str) -> None:
        path = Path(self.cfg.store.path)
        if not path.exists():  # never create the store as root
            return
        conn = store.connect(path, busy_timeout_ms=self.cfg.store.busy_timeout_ms)
        try:
            with store.transaction(conn):
                store.set_state(conn, "export.state", state)
        finally:
            conn.close()

    def _owner(self) -> tuple[int, int]:
        try:
            st = Path(self.cfg.store.path).stat()
        except OSError:
            return (0, 0)
        return (st.st_uid, st.st_gid)

    # -- lifecycle

    def start(self) -> None:
        """Prepare the mount directory, clean stale mounts of ours, LED normal."""
        self.log.line("usb-watch started")
        self.prepare_mount_dir()
        self.clean_stale_mounts()
        self.led.set(ledmod.NORMAL)

    def prepare_mount_dir(self) -> None:
        """``mount_dir``: root's, traversable by the store's group only (the snapshot child)."""
        _, gid = self._owner()
        # Parents created here (/run/fieldgate) must stay traversable for the snapshot child
        # whatever umask the daemon runs with (supervisor gives it 027).
        old_umask = os.umask(0o022)
        try:
            self.mount_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        finally:
            os.umask(old_umask)
        if os.geteuid() == 0:
            os.chown(self.mount_dir, 0, gid)
            self.mount_dir.chmod(0o710)

    def clean_stale_mounts(self) -> None:
        prefix = str(self.mount_dir) + "/"
        for point in sorted(
            (p for p in mount_points() if p.startswith(prefix)), key=len, reverse=True
        ):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            self.log.line(f"stale mount {point} detached")
        for child in self.mount_dir.iterdir():
            if child.is_dir() and not is_mounted(child):
                try:
                    child.rmdir()
                except OSError as exc:
                    self.log.line(f"stale directory {child} left alone: {exc.strerror}")

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
                target = self.export_partition(part, members)
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

    def export_partition(self, part: str, members: set[str]) -> str:
        """Mount, check the password, export, unmount; returns the export's database name."""
        node = str(DEV / part)
        if not Path(node).exists():
            raise NotQualified(f"device node {node} does not exist")
        fstype = probe_filesystem(node)
        if fstype is None:
            raise NotQualified("no filesystem recognised")
        self.log.line(f"{part}: filesystem {fstype}")
        self.prepare_mount_dir()  # the store (and its group) may have appeared since start
        m = mount_partition(part, fstype, self.mount_dir, self._owner())
        self.log.line(f"{part}: mounted ({m.driver}, {MOUNT_OPTS}) on {m.point}")
        outcome: str | None = None
        try:
            given = read_password(m.point)
            if given is None:
                raise NotQualified(f"no {PASSWORD_FILE} at the root")
            if not password_matches(given, self.cfg.secret("export.password_file")):
                raise NotQualified(f"wrong password in {PASSWORD_FILE}")
            self.log.line(f"{part}: {PASSWORD_FILE} matches")
            if os.statvfs(m.point).f_flag & os.ST_RDONLY:
                raise FieldgateError("the filesystem is read-only (write-protected drive?)")
            abort = _Abort(self.stop, self.cfg.export.spool_dir, members)
            result = export_to(
                self.cfg,
                m.point,
                note=lambda text: self.log.line(f"{part}: {text}"),
                isolate=True,
                stop=abort,
            )
            outcome = result.names.db
        finally:
            problem = unmount(m)
            self.log.line(f"{part}: synced and unmounted" + (f" ({problem})" if problem else ""))
        if problem and outcome is not None:
            raise FieldgateError(f"export written, but unmounting failed: {problem}")
        return outcome


def watch_cmd(cfg: Config, args: Any) -> int:
    """``fieldgate usb-watch``: the long-running USB export daemon."""
    stop = StopFlag().install()
    watcher = Watcher(cfg, stop)
    try:
        watcher.start()
        watcher.run()
    finally:
        watcher.log.close()
    return 0
