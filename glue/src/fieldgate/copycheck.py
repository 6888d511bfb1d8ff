"""Proof that a file on a drive holds the bytes that were written into it.

:class:`Written` is filled as a file's bytes are handed to ``write`` — by SQLite, seen
through :mod:`fieldgate.teevfs`, or by a front-to-back copy — with a CRC-32 of every page.
:func:`check_on_device` then reads the file back from the device
(:func:`fieldgate.fsutil.read_from_device`, not the page cache), compares every page with
what was written and returns the SHA-256 of the bytes the device gave back. A page the
device returns differently, a file of another length, a page that was never written but
is not zero: each is a :class:`CopyDamaged` naming the first place it differs.

A CRC-32 per page misses a damaged page with odds of 1 in 2^32 (the checksum
filesystems use the same kind of check); the SHA-256 is then that of the bytes the
device holds, so ``sha256sum -c`` later checks exactly what was verified here.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fieldgate.errors import FieldgateError
from fieldgate.fsutil import read_from_device


class CopyDamaged(FieldgateError):
    """The device does not return what was written."""


class Written:
    """A CRC-32 of every page written into one file, its size, and its first page.

    Pages of the file that were never written (holes) must read back as zeros.
    """

    def __init__(self, page_size: int) -> None:
        if page_size <= 0:
            raise ValueError(page_size)
        self.page_size = page_size
        self._zero_crc = zlib.crc32(bytes(page_size))
        self.crcs = array.array("I")
        self.size = 0
        #: The bytes last written as the first page (a database's header).
        self.first_page = b""

    def record(self, offset: int, data: bytes | memoryview) -> None:
        """Note ``data`` written at ``offset`` (whole pages; a later write of a page wins)."""
        size = self.page_size
        if offset % size or len(data) % size:
            raise ValueError(f"a write of {len(data)} bytes at {offset} is not whole pages")
        first, count = offset // size, len(data) // size
        missing = first + count - len(self.crcs)
        if missing > 0:
            self.crcs.extend(itertools.repeat(self._zero_crc, missing))
        view = memoryview(data)
        crc32, crcs = zlib.crc32, self.crcs
        for k in range(count):
            crcs[first + k] = crc32(view[k * size : (k + 1) * size])
        if offset == 0 and count:
            self.first_page = bytes(view[:size])
        self.size = max(self.size, offset + len(data))

    def first_difference(self, offset: int, data: bytes | memoryview) -> int | None:
        """The number of the first page in ``data`` (read at ``offset``) that differs from
        what was written, or None."""
        size = self.page_size
        view = memoryview(data)
        first = offset // size
        crc32, crcs = zlib.crc32, self.crcs
        for k in range(len(view) // size):
            page = first + k
            if page >= len(crcs) or crcs[page] != crc32(view[k * size : (k + 1) * size]):
                return page
        if len(view) % size:  # a partial page: the file is longer than what was written
            return first + len(view) // size
        return None


class Copied:
    """What a front-to-back copy wrote: a CRC-32 of every ``chunk`` bytes, the SHA-256 of the
    whole, its size and first page.

    ``reread(offset, length)`` returns the bytes the copy wrote there again (the source is
    held still until the copy is verified): a chunk whose CRC differs is compared with them
    page by page, so that the damage is named to the page at no cost while nothing differs.
    """

    def __init__(self, page_size: int, chunk: int, reread: Callable[[int, int], bytes]) -> None:
        if page_size <= 0 or chunk % page_size:
            raise ValueError((page_size, chunk))
        self.page_size = page_size
        self.chunk = chunk
        self.reread = reread
        self.crcs = array.array("I")
        self.size = 0
        self.first_page = b""
        self._sha = hashlib.sha256()

    def record(self, data: bytes | memoryview) -> None:
        """Note the next ``data`` of the copy (a whole chunk, or the last, shorter one).

        Called from one thread at a time, in order; CRC-32 and SHA-256 of large buffers
        run without the GIL, so a thread may do this while another writes the same bytes.
        """
        if self.size % self.chunk or len(data) > self.chunk:
            raise ValueError(f"{len(data)} bytes at {self.size}: not the next chunk")
        if self.size == 0:
            self.first_page = bytes(data[: self.page_size])
        self.crcs.append(zlib.crc32(data))
        self._sha.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def first_difference(self, offset: int, data: bytes | memoryview) -> int | None:
        """The number of the first page in ``data`` (read at ``offset``) that differs from
        what was written, or None."""
        k, rest = divmod(offset, self.chunk)
        whole = min(self.chunk, self.size - offset)
        aligned = rest == 0 and k < len(self.crcs) and len(data) == whole
        if aligned and zlib.crc32(data) == self.crcs[k]:
            return None
        size = self.page_size
        view = memoryview(data)
        end = min(offset + len(view), self.size)
        if end > offset:
            source = self.reread(offset, end - offset)
            for at in range(0, end - offset, size):
                if view[at : at + size] != source[at : at + size]:
                    return (offset + at) // size
        if offset + len(view) > self.size:  # the file is longer than what was written
            return max(offset, self.size) // size
        if aligned:
            raise FieldgateError(
                "the source of the copy changed while it was held still: the export "
                "cannot say what was written"
            )
        return None


def check_on_device(path: str | Path, written: Written | Copied, *, digest: bool = True) -> str:
    """Read ``path`` back from the device, compare it with ``written``; its SHA-256.

    CopyDamaged names the first page that differs (or the lengths); OSError when the device
    fails to read. The hash and the comparison of each chunk run side by side. Without
    ``digest`` nothing is hashed beyond the comparison (``Copied`` holds the SHA-256 of what
    was written, which the comparison proved the device returns) and "" is returned.
    """
    sha = hashlib.sha256()
    offset = 0
    page: int | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="read-back-sha256") as hasher:
        for chunk in read_from_device(path):
            hashed = hasher.submit(sha.update, chunk) if digest else None
            try:
                page = written.first_difference(offset, chunk)
            finally:
                if hashed is not None:
                    hashed.result()
            if page is not None:
                break
            offset += len(chunk)
    if page is not None:
        start = page * written.page_size
        raise CopyDamaged(
            f"the copy read back from the drive differs from what was written: page "
            f"{page + 1} (bytes {start}-{start + written.page_size - 1}) of {Path(path).name}"
        )
    if offset != written.size:
        raise CopyDamaged(
            f"the copy read back from the drive has {offset} bytes, {written.size} were "
            f"written: {Path(path).name}"
        )
    return sha.hexdigest() if digest else ""


def check_bytes_on_device(path: str | Path, data: bytes) -> None:
    """Read a small file back from the device; CopyDamaged unless it holds ``data``."""
    got = b"".join(bytes(chunk) for chunk in read_from_device(path))
    if got != data:
        raise CopyDamaged(
            f"the file read back from the drive differs from what was written: {Path(path).name}"
        )
