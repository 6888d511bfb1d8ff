"""Proof that a file on a drive holds the bytes that were written into it.

:class:`Written` is filled as a file's bytes are handed to ``write`` — by SQLite, seen
through :mod:`fieldgate.teevfs`, or by a front-to-back copy — with a CRC-32 of every page;
:class:`Copied` notes a copy of a source that stays unchanged until the copy is verified,
and compares with the source itself (exact, the writes not hashed; the source's SHA-256
taken in a thread beside the copy). :func:`check_on_device` then reads the file back
from the device (:func:`fieldgate.fsutil.read_from_device`, not the page cache), compares
every page with what was written and returns the SHA-256 of the bytes the device gave
back (for a :class:`Copied`, the source's, which they equal byte for byte). A page the
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
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fieldgate.errors import FieldgateError
from fieldgate.fsutil import read_from_device

#: Bytes per read of the source hashed beside the copy.
HASH_CHUNK = 1 << 20


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
    """What a front-to-back copy of a source held still wrote: its size and first page.

    ``reread(offset, buffer)`` fills ``buffer`` with the bytes the copy wrote at
    ``offset`` again (the source does not change until the copy is verified; a header
    changed on the way is changed again) and returns how many it read. The comparison
    with the bytes read back from the device is then exact, without a hash of what was
    written. :meth:`hash_source` takes the SHA-256 of the source's bytes in a thread beside
    the copy and the sync; once the bytes read back compare equal with them, it is theirs
    too, and the read-back itself hashes nothing.
    """

    def __init__(self, page_size: int, reread: Callable[[int, bytearray], int]) -> None:
        if page_size <= 0:
            raise ValueError(page_size)
        self.page_size = page_size
        self.reread = reread
        self.size = 0
        self.first_page = b""
        self._buffer = bytearray()
        self._hashing: _SourceHash | None = None

    def record(self, data: bytes | memoryview) -> None:
        """Note the next ``data`` of the copy (written right after what was recorded)."""
        if self.size == 0:
            self.first_page = bytes(data[: self.page_size])
        self.size += len(data)

    def hash_source(self, size: int) -> None:
        """Start taking the SHA-256 of the source's first ``size`` bytes (as the copy holds
        them) in a thread; :meth:`close` stops it."""
        self.close()
        self._hashing = _SourceHash(self.reread, size)

    @property
    def hashes_source(self) -> bool:
        """Whether :meth:`hash_source` was asked for."""
        return self._hashing is not None

    def source_sha256(self) -> str:
        """The SHA-256 :meth:`hash_source` took (waiting for it). FieldgateError when the
        source held fewer bytes than were copied."""
        if self._hashing is None:
            raise ValueError("hash_source was not asked for")
        size, digest = self._hashing.result()
        if size != self.size:
            raise FieldgateError(
                f"the source of the copy was hashed over {size} bytes, {self.size} were "
                "copied: it changed while it was held still"
            )
        return digest

    def close(self) -> None:
        """Stop the hashing, if any (before the source is let go)."""
        if self._hashing is not None:
            self._hashing.stop()

    def first_difference(self, offset: int, data: bytes | memoryview) -> int | None:
        """The number of the first page in ``data`` (read at ``offset``) that differs from
        what was written, or None."""
        view = memoryview(data)
        n = max(0, min(len(view), self.size - offset))
        if n:
            if len(self._buffer) != n:
                self._buffer = bytearray(n)
            source = self._buffer
            got = self.reread(offset, source)
            if got != n:
                raise FieldgateError(
                    f"the source of the copy holds {offset + got} bytes, {self.size} were "
                    "copied: it changed while it was held still"
                )
            if source != view[:n]:  # bytearray against a buffer: one memcmp
                size = self.page_size
                for at in range(0, n, size):
                    if source[at : at + size] != view[at : at + size]:
                        return (offset + at) // size
        if len(view) > n:  # the file is longer than what was written
            return max(offset, self.size) // self.page_size
        return None


class _SourceHash:
    """The SHA-256 of ``reread``'s bytes from 0 to ``size``, taken in a thread (hashlib
    and the reads let the GIL go) while the export copies and syncs."""

    def __init__(self, reread: Callable[[int, bytearray], int], size: int) -> None:
        self._sha = hashlib.sha256()
        self._hashed = 0
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(reread, size), name="copy-sha256", daemon=True
        )
        self._thread.start()

    def _run(self, reread: Callable[[int, bytearray], int], size: int) -> None:
        buffer = bytearray(HASH_CHUNK)
        try:
            while self._hashed < size and not self._stop.is_set():
                got = min(reread(self._hashed, buffer), size - self._hashed)
                if got <= 0:
                    break
                self._sha.update(memoryview(buffer)[:got])
                self._hashed += got
        except BaseException as exc:  # handed to result()
            self._failure = exc

    def result(self) -> tuple[int, str]:
        """(bytes hashed, their SHA-256), once the thread is done."""
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._hashed, self._sha.hexdigest()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def check_on_device(
    path: str | Path, written: Written | Copied, chunks: Iterable[memoryview] | None = None
) -> str:
    """Read ``path`` back from the device, compare it with ``written``; its SHA-256.

    ``chunks``: the file's bytes as read from the device some other way (its extents on
    the block device, :func:`fieldgate.fsutil.read_extents`); by default the file is read
    through its filesystem (:func:`fieldgate.fsutil.read_from_device`). CopyDamaged names
    the first page that differs (or the lengths); OSError when the device fails to read.
    The SHA-256 is that of the bytes read back: hashed beside the comparison of each
    chunk, or, for a :class:`Copied` whose source was hashed (:meth:`Copied.hash_source`),
    that hash, the bytes read back having compared equal with the source.
    """
    sha = None if isinstance(written, Copied) and written.hashes_source else hashlib.sha256()
    offset = 0
    page: int | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="read-back-sha256") as hasher:
        for chunk in read_from_device(path) if chunks is None else chunks:
            hashed = None if sha is None else hasher.submit(sha.update, chunk)
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
    if sha is None:
        assert isinstance(written, Copied)  # only a Copied hashes its source
        return written.source_sha256()
    return sha.hexdigest()


def check_bytes_on_device(path: str | Path, data: bytes) -> None:
    """Read a small file back from the device; CopyDamaged unless it holds ``data``."""
    got = b"".join(bytes(chunk) for chunk in read_from_device(path))
    if got != data:
        raise CopyDamaged(
            f"the file read back from the drive differs from what was written: {Path(path).name}"
        )
