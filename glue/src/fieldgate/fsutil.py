"""Filesystem durability and facts: fsync, atomic writes, file hashes, mounts, sizes.

Every module that must leave a file on disk so that a power cut cannot half-undo it uses
these helpers, so that "write under a temporary name, fsync, rename, fsync the directory"
is written once. The facts (mount table, disk use, byte sizes for log lines) are read the
way ``df`` and ``/proc/self/mountinfo`` give them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: errno values of a filesystem that cannot fsync a directory (some FUSE drivers).
_DIR_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def fsync_file(path: str | Path) -> None:
    """Push a file's data and metadata to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a create, rename or unlink in directory ``path`` durable.

    A filesystem that cannot fsync directories (some FUSE drivers) is taken at its word:
    there is nothing more to do there.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_new(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (it must not exist, and is never a followed symlink), write, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: str | Path, *, mode: int | None = None, tmp: str | Path | None = None
) -> Iterator[BinaryIO]:
    """Write ``path`` all or nothing: a temporary file is yielded, then fsynced, renamed over
    ``path`` and the directory fsynced. On any failure the temporary file is removed.

    ``mode``: the file's permissions, set before it gets its name (default: 0666 less the
    umask). ``tmp``: the temporary path (default ``.<name>.<pid>.tmp`` beside ``path``),
    for callers that clean up their own leftovers by name.
    """
    path = Path(path)
    tmp_path = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # A temporary file left by a crash is overwritten (never followed if it is a link).
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    fd = os.open(tmp_path, flags, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # before any byte is written, whatever the umask or leftover
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp_path.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(
    path: str | Path, data: bytes, *, mode: int | None = None, tmp: str | Path | None = None
) -> None:
    """:func:`atomic_file` for data already in memory."""
    with atomic_file(path, mode=mode, tmp=tmp) as f:
        f.write(data)


def unlink_durably(path: Path) -> None:
    """Remove ``path`` (if it is there) and make the removal durable."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)


def move_file(src: Path, dst: Path, *, tmp: Path | None = None) -> None:
    """Move a file by rename, or across filesystems by copy, fsync, rename and unlink.

    The rename itself is not fsynced: after a power cut the file is under one name or the
    other, never under neither.
    """
    try:
        src.replace(dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = tmp or dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
        tmp.replace(dst)
        src.unlink()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where, and which filesystem type."""

    point: str
    fstype: str


def _unescape_mount(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str | Path = "/proc/self/mountinfo") -> list[Mount]:
    """Every mount of this mount namespace, in mount order (empty when unreadable)."""
    try:
        lines = Path(mountinfo).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    result = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5:
            continue
        fstype = right.split()[0] if right.split() else ""
        result.append(Mount(_unescape_mount(fields[4]), fstype))
    return result


def mount_points() -> list[str]:
    """Every mount point of this mount namespace."""
    return [m.point for m in mounts()]


def is_mounted(point: str | Path) -> bool:
    """Whether something is mounted exactly at ``point``."""
    return str(point) in mount_points()


def filesystem_type(path: str | Path) -> str:
    """The type of the filesystem holding ``path`` (``ext4``, ``fuse.fusefat``; "" unknown)."""
    target = str(Path(path).resolve())
    best, kind = "", ""
    for m in mounts():
        inside = target == m.point or target.startswith(m.point.rstrip("/") + "/")
        if inside and m.fstype and len(m.point) >= len(best):
            best, kind = m.point, m.fstype
    return kind


def disk_usage_percent(path: str | Path) -> float:
    """Used space of the filesystem holding ``path``, as root sees it (like ``df``'s Use%)."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    if total == 0:
        return 0.0
    avail = st.f_bavail * st.f_frsize
    used = total - st.f_bfree * st.f_frsize
    # df's Use%: used / (used + available to unprivileged users)
    return 100.0 * used / max(1, used + avail)


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


#: Binary units for log lines and messages (``12.3 MiB``).
IEC_UNITS = ("B", "KiB", "MiB", "GiB")


def human_bytes(n: float, units: Sequence[str] = IEC_UNITS) -> str:
    """A byte count in the largest of ``units`` (steps of 1024) that keeps it >= 1.

    The first unit is printed without decimals (``512 B``), the others with one
    (``7.4 GiB``); the last unit takes everything above it.
    """
    unit = units[-1]
    for candidate in units[:-1]:
        if abs(n) < 1024:
            unit = candidate
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == units[0] else f"{n:.1f} {unit}"
