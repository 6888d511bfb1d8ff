"""Block devices for the USB export: which drive a partition is on, its filesystem,
mounting it safely, and the ``Password.txt`` at its root.

Mounts are always ``nosuid,nodev,noexec`` on a fresh private directory under
``export.mount_dir``: ext2/3/4 by the kernel, vfat and exFAT by the kernel when it has them,
else by FUSE (``fusefat -o rw+``, ``mount.exfat-fuse``), with the files mapped to the store's
owner so the unprivileged snapshot child can write them.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fieldgate.errors import FieldgateError
from fieldgate.fsutil import is_mounted, mount_points

SYS_BLOCK = Path("/sys/class/block")
DEV = Path("/dev")
PASSWORD_FILE = "Password.txt"  # noqa: S105 (a file name)
PASSWORD_MAX_BYTES = 4096
MOUNT_OPTS = "nosuid,nodev,noexec"
MOUNT_WAIT_SECS = 15.0
FUSE_EXIT_WAIT_SECS = 120.0


class NotQualified(FieldgateError):
    """A partition that is not an export target (no filesystem, no or wrong password)."""


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
            # to exit, which is when it has written everything to the device. fsname puts
            # the device in the mount table, as for the other filesystems.
            opts = f"rw+,fsname={node},subtype=fusefat,{fuse_opts}"
            m.fuse = subprocess.Popen(
                ["fusefat", "-f", "-o", opts, node, str(point)],
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


def prepare_mount_dir(mount_dir: Path, gid: int) -> None:
    """``mount_dir``: root's, traversable by the store's group only (the snapshot child)."""
    # Parents created here (/run/fieldgate) must stay traversable for the snapshot child
    # whatever umask the daemon runs with (supervisor gives it 027).
    old_umask = os.umask(0o022)
    try:
        mount_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    finally:
        os.umask(old_umask)
    if os.geteuid() == 0:
        os.chown(mount_dir, 0, gid)
        mount_dir.chmod(0o710)


def detach_stale_mounts(mount_dir: Path, note: Callable[[str], None]) -> None:
    """Detach mounts left under ``mount_dir`` (a crash mid-export) and remove their dirs."""
    prefix = str(mount_dir) + "/"
    for point in sorted((p for p in mount_points() if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        note(f"stale mount {point} detached")
    for child in mount_dir.iterdir():
        if child.is_dir() and not is_mounted(child):
            try:
                child.rmdir()
            except OSError as exc:
                note(f"stale directory {child} left alone: {exc.strerror}")
