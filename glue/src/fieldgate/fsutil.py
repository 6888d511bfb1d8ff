"""Filesystem durability and facts: fsync, atomic writes, file hashes, reading a file back
from its device, mounts, sizes.

Every module that must leave a file on disk so that a power cut cannot half-undo it uses
these helpers, so that "write under a temporary name, fsync, rename, fsync the directory"
is written once. The facts (mount table, disk use, byte sizes for log lines) are read the
way ``df`` and ``/proc/self/mountinfo`` give them.

**Reading back from the device.** After ``fsync`` the bytes of a file are still in the
page cache, so an ordinary read returns what was written, whatever the device holds. Two
caches can stand between a reader and the device, and :func:`read_from_device` and
:func:`flush_block_device` bypass both (proven by ``tests/test_usb.py``, which flips a
byte in the drive image under a mounted filesystem):

- the file's own pages, for a kernel filesystem (ext4, vfat/exFAT by the kernel) and for
  a FUSE one (exfat-fuse keeps them across opens): the file is read with ``O_DIRECT``
  (or, where a filesystem refuses it, after ``POSIX_FADV_DONTNEED`` on the file);
- the block device's pages, for a FUSE driver that reads and writes the device with
  ordinary ``pread``/``pwrite`` (fusefat, exfat-fuse): ``fdatasync`` and
  ``POSIX_FADV_DONTNEED`` on the device node, so that the driver's next read comes from
  the device (needs an open descriptor of the node; no capability, unlike ``BLKFLSBUF``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


def read_small_file(path: str | Path, max_bytes: int) -> bytes | None:
    """The content of a small file another program writes (a status record), None when it
    does not exist; ``ValueError`` when it is larger than ``max_bytes`` (never read whole),
    ``OSError`` for any other failure to read it."""
    try:
        with Path(path).open("rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    return raw


def load_small_json(
    path: str,
    max_bytes: int,
    what: str,
    parse: Callable[[Any], dict[str, Any]],
    absent: dict[str, Any],
) -> dict[str, Any]:
    """A small JSON record another program writes, as a part of ``status``, read by
    :func:`read_small_file`: ``{"file": path, **parse(data)}``; when the file does not
    exist, ``{"file", "state": "none", **absent}``; when it cannot be read or is not ``what``
    (too large, not JSON, ``parse`` raises ValueError, KeyError or TypeError),
    ``{"file", "state": "unreadable", "error"}``: one line naming the cause."""
    result: dict[str, Any] = {"file": path}
    try:
        raw = read_small_file(path, max_bytes)
    except OSError as exc:
        return {**result, "state": "unreadable", "error": exc.strerror or str(exc)}
    except ValueError as exc:
        return {**result, "state": "unreadable", "error": f"not {what} ({exc})"}
    if raw is None:
        return {**result, "state": "none", **absent}
    try:
        return {**result, **parse(json.loads(raw))}
    except (ValueError, KeyError, TypeError) as exc:
        return {**result, "state": "unreadable", "error": f"not {what} ({exc})"}


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


#: Bytes per read of :func:`read_from_device` (a multiple of every device's block size;
#: FUSE drivers answer 1 MiB direct reads faster than larger ones).
READ_BACK_CHUNK = 1 << 20


def drop_cached_pages(fd: int) -> None:
    """Start writing the dirty pages of a file (or block device) out and drop its clean ones.

    Linux's ``POSIX_FADV_DONTNEED`` begins writeback of dirty pages without waiting, then
    drops the pages that are clean: after an ``fsync`` it empties the file's cache; during
    a long write it keeps the device busy instead of leaving everything for the final sync.
    """
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def flush_block_device(fd: int) -> None:
    """Write a block device's dirty pages out and drop its cached ones (see the module doc).

    For a FUSE filesystem whose driver reads and writes the device node itself: afterwards
    what the driver wrote is on the device, and its next read comes from the device.
    """
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_from_device(path: str | Path, chunk: int = READ_BACK_CHUNK) -> Iterator[memoryview]:
    """The bytes of a file as its device returns them, front to back, ``chunk`` at a time.

    Reads with ``O_DIRECT`` into aligned buffers, or, where the filesystem refuses that,
    after dropping the file's cached pages. The next chunk is read while the caller looks
    at the current one; each view is valid until the next one is asked for. Only the
    file's own cache is bypassed: a FUSE driver's device needs :func:`flush_block_device`
    first.
    """
    fd, at = -1, 0

    def read(k: int, buffer: mmap.mmap) -> tuple[memoryview, bool]:
        nonlocal fd, at
        if k == 0:
            fd, n = _first_read(path, buffer)
        else:
            n = os.preadv(fd, [buffer], at)
        at += n
        return memoryview(buffer)[:n], n > 0

    try:
        yield from _read_ahead(read, chunk)
    finally:
        if fd >= 0:
            os.close(fd)


#: Reads of a device with ``O_DIRECT`` start and end on multiples of this (any logical
#: block size up to it).
DIRECT_ALIGN = 4096


def read_extents(
    fd: int, extents: Sequence[tuple[int, int]], chunk: int = READ_BACK_CHUNK
) -> Iterator[memoryview]:
    """The bytes at ``extents`` ((offset, length) pairs) of the block device ``fd``, in
    order, ``chunk`` at a time, as the device returns them.

    Read with ``O_DIRECT`` (set on the descriptor for the reads, then taken off again) into
    aligned buffers; where the device refuses it, with ordinary reads, which then come from
    the device only when the caller dropped its cache (:func:`flush_block_device`). The
    next chunk is read while the caller looks at the current one; each view is valid until
    the next one is asked for. A read the device cuts short ends the bytes there.
    """
    pieces: list[tuple[int, int, int, int]] = []  # aligned start, aligned length, skip, bytes
    for start, length in extents:
        at, end = start, start + length
        while at < end:
            n = min(chunk, end - at)
            low = at - at % DIRECT_ALIGN
            high = -(-(at + n) // DIRECT_ALIGN) * DIRECT_ALIGN
            pieces.append((low, high - low, at - low, n))
            at += n
    if not pieces:
        return
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)

    def read(k: int, buffer: mmap.mmap) -> tuple[memoryview, bool]:
        low, span, skip, want = pieces[k]
        view = memoryview(buffer)[:span]
        try:
            got = os.preadv(fd, [view], low)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)  # no direct I/O here
            got = os.preadv(fd, [view], low)
        n = max(0, min(want, got - skip))
        return view[skip : skip + n], n == want and k + 1 < len(pieces)

    try:
        yield from _read_ahead(read, chunk + 2 * DIRECT_ALIGN)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _read_ahead(
    read: Callable[[int, mmap.mmap], tuple[memoryview, bool]], size: int
) -> Iterator[memoryview]:
    """The bytes ``read(k, buffer)`` returns for k = 0, 1, … (a view into ``buffer`` and
    whether more may follow), read into two page-aligned buffers of ``size`` bytes (as
    ``O_DIRECT`` wants) in turn: read k + 1 runs in a thread while the caller looks at the
    view of read k, which stays valid until the next one is asked for. Empty views are
    not passed on."""
    buffers = (mmap.mmap(-1, size), mmap.mmap(-1, size))
    view, more = read(0, buffers[0])
    with ThreadPoolExecutor(1, thread_name_prefix="read-back") as reader:
        k = 0
        while True:
            ahead = reader.submit(read, k + 1, buffers[(k + 1) % 2]) if more else None
            try:
                if len(view):
                    yield view
            finally:
                if ahead is not None:
                    view, more = ahead.result()
            if ahead is None:
                return  # the buffers go with the last view the caller holds
            k += 1


def _first_read(path: str | Path, buffer: mmap.mmap) -> tuple[int, int]:
    """Open ``path`` to read past the page cache and read its first chunk: (fd, bytes)."""
    fd = _open_uncached(path, direct=True)
    try:
        return fd, os.preadv(fd, [buffer], 0)
    except OSError as exc:
        os.close(fd)
        # Some filesystems accept O_DIRECT at open and refuse it at read.
        if exc.errno != errno.EINVAL:
            raise
    fd = _open_uncached(path, direct=False)
    try:
        return fd, os.preadv(fd, [buffer], 0)
    except BaseException:
        os.close(fd)
        raise


def _open_uncached(path: str | Path, direct: bool) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem has no direct I/O
                raise
    fd = os.open(path, flags)
    drop_cached_pages(fd)
    return fd


def is_block_device(path: str | Path) -> bool:
    """Whether ``path`` is a block device node."""
    try:
        return stat.S_ISBLK(Path(path).stat().st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where, which filesystem type, from what, and
    which directory of that filesystem is mounted there (``/`` but for bind mounts)."""

    point: str
    fstype: str
    source: str = ""
    root: str = "/"


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
        tail = right.split()
        fstype = tail[0] if tail else ""
        source = _unescape_mount(tail[1]) if len(tail) > 1 else ""
        result.append(Mount(_unescape_mount(fields[4]), fstype, source, _unescape_mount(fields[3])))
    return result


def mount_points() -> list[str]:
    """Every mount point of this mount namespace."""
    return [m.point for m in mounts()]


def is_mounted(point: str | Path) -> bool:
    """Whether something is mounted exactly at ``point``."""
    return str(point) in mount_points()


def mount_of(path: str | Path) -> Mount | None:
    """The mount holding ``path`` (the innermost one), or None when unknown."""
    target = str(Path(path).resolve())
    best: Mount | None = None
    for m in mounts():
        inside = target == m.point or target.startswith(m.point.rstrip("/") + "/")
        if inside and m.fstype and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def filesystem_type(path: str | Path) -> str:
    """The type of the filesystem holding ``path`` (``ext4``, ``fuse.fusefat``; "" unknown)."""
    m = mount_of(path)
    return m.fstype if m else ""


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
