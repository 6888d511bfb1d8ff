"""A SQLite VFS that shows fieldgate every byte SQLite writes to a database file.

When the USB export cannot copy the store's file held still (another reader holds part of
the write-ahead log), it takes its snapshot with SQLite's online backup straight onto the
drive and must then prove that the drive holds exactly what SQLite wrote. Reading the file back
through the page cache cannot tell (a page evicted and read again comes from the drive),
so the bytes are observed on their way out: this VFS wraps the default one (``unix``)
through ctypes, on the very libsqlite3 the ``sqlite3`` module uses. A file opened through
it as a main database keeps the default I/O methods except those that see its bytes:

- consecutive writes are gathered into writes of up to :data:`GATHER_BYTES` (a FUSE
  driver takes SQLite's page-sized writes one request each), and each gathered write is
  shown to the observer, then written;
- with ``in_order``, a write that would start past the end of the file first fills the gap
  with zeros (not shown to the observer: a page never written reads back as zeros), and a
  write inside the file (SQLite's backup writes page 1 at its commit, before the last
  pages behind it) waits until SQLite next reads, syncs, asks for the size, truncates,
  sends a file control or closes: the file only ever grows front to back, and is written
  into only once it has stopped growing. fusefat loses a file that is extended out of
  order, or extended again after its first cluster was rewritten, and takes this order;
- reads, size queries, truncation, syncs, file controls and close first write out what
  is gathered, so SQLite always reads its own writes; the memory-mapped fetch methods are
  withheld (the file is never read through a mapping that would miss gathered bytes).

Python exceptions never cross into SQLite: a failing observer turns the call into
``SQLITE_IOERR`` and is raised again by :meth:`TeeVfs.raise_failure` once SQLite has
returned. :func:`available` says whether the VFS can be used at all (the ``sqlite3``
module must use a shared libsqlite3 that ctypes can reach, as on Debian).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import sqlite3
from collections.abc import Callable
from types import TracebackType

SQLITE_OK = 0
SQLITE_IOERR = 10
SQLITE_FULL = 13
SQLITE_OPEN_MAIN_DB = 0x00000100
#: The largest write the VFS gathers from consecutive page writes: the unix VFS writes at
#: most 128 KiB - 1 per call (it masks the length to 17 bits), and FUSE drivers take
#: 128 KiB per request.
GATHER_BYTES = 124 << 10

Observer = Callable[[int, memoryview], None]

_int, _i64, _ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
# Pointers SQLite owns (file names, out-parameters) are passed through untouched: c_void_p.
_OPEN = ctypes.CFUNCTYPE(_int, _ptr, _ptr, _ptr, _int, _ptr)
_CLOSE = ctypes.CFUNCTYPE(_int, _ptr)
_READ = ctypes.CFUNCTYPE(_int, _ptr, _ptr, _int, _i64)
_WRITE = ctypes.CFUNCTYPE(_int, _ptr, _ptr, _int, _i64)
_TRUNCATE = ctypes.CFUNCTYPE(_int, _ptr, _i64)
_SYNC = ctypes.CFUNCTYPE(_int, _ptr, _int)
_FILE_SIZE = ctypes.CFUNCTYPE(_int, _ptr, _ptr)
_FILE_CONTROL = ctypes.CFUNCTYPE(_int, _ptr, _int, _ptr)


class _IoMethods(ctypes.Structure):
    """``sqlite3_io_methods`` (version 3 layout; the version field says what is valid)."""

    _fields_ = [("iVersion", _int)] + [
        (name, _ptr)
        for name in (
            "xClose",
            "xRead",
            "xWrite",
            "xTruncate",
            "xSync",
            "xFileSize",
            "xLock",
            "xUnlock",
            "xCheckReservedLock",
            "xFileControl",
            "xSectorSize",
            "xDeviceCharacteristics",
            "xShmMap",
            "xShmLock",
            "xShmBarrier",
            "xShmUnmap",
            "xFetch",
            "xUnfetch",
        )
    ]


class _Vfs(ctypes.Structure):
    """``sqlite3_vfs`` (version 3 layout)."""

    _fields_ = [
        ("iVersion", _int),
        ("szOsFile", _int),
        ("mxPathname", _int),
        ("pNext", _ptr),
        ("zName", ctypes.c_char_p),
        ("pAppData", _ptr),
    ] + [
        (name, _ptr)
        for name in (
            "xOpen",
            "xDelete",
            "xAccess",
            "xFullPathname",
            "xDlOpen",
            "xDlError",
            "xDlSym",
            "xDlClose",
            "xRandomness",
            "xSleep",
            "xCurrentTime",
            "xGetLastError",
            "xCurrentTimeInt64",
            "xSetSystemCall",
            "xGetSystemCall",
            "xNextSystemCall",
        )
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The libsqlite3 the ``sqlite3`` module runs on, or None when ctypes cannot reach it."""
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.sqlite3_libversion_number.restype = _int
    major, minor, patch = sqlite3.sqlite_version_info
    if lib.sqlite3_libversion_number() != major * 1_000_000 + minor * 1000 + patch:
        return None
    lib.sqlite3_vfs_find.restype = ctypes.POINTER(_Vfs)
    lib.sqlite3_vfs_find.argtypes = [ctypes.c_char_p]
    lib.sqlite3_vfs_register.argtypes = [ctypes.POINTER(_Vfs), _int]
    lib.sqlite3_vfs_unregister.argtypes = [ctypes.POINTER(_Vfs)]
    return lib


@functools.cache
def available() -> bool:
    """Whether :class:`TeeVfs` works here (a VFS registered through ctypes is the one the
    ``sqlite3`` module's connections find)."""
    if _library() is None:
        return False
    with TeeVfs(lambda _offset, _data: None) as vfs:
        try:
            sqlite3.connect(f"file:fieldgate-probe?mode=memory&vfs={vfs.name}", uri=True).close()
        except sqlite3.Error:
            return False
    return True


class _Open:
    """A database file opened through the VFS: its gathered bytes and original methods."""

    def __init__(self, methods: _IoMethods) -> None:
        self.close = _CLOSE(methods.xClose)
        self.read = _READ(methods.xRead)
        self.write = _WRITE(methods.xWrite)
        self.truncate = _TRUNCATE(methods.xTruncate)
        self.sync = _SYNC(methods.xSync)
        self.file_size = _FILE_SIZE(methods.xFileSize)
        self.file_control = _FILE_CONTROL(methods.xFileControl)
        self.buffer = (ctypes.c_char * GATHER_BYTES)()
        self.address = ctypes.addressof(self.buffer)
        self.start = 0
        self.length = 0
        self.end = 0  # the file's size as written through the VFS (for ``in_order``)
        self.held: list[tuple[int, bytes]] = []  # writes inside the file, for later


#: Zeros that fill a gap before a write past the end of a file (``in_order``).
_ZEROS = (ctypes.c_char * GATHER_BYTES)()

_names = itertools.count(1)
#: VFSes left with files open when their context closed: SQLite may still call them.
_kept: list[TeeVfs] = []


class TeeVfs:
    """A VFS (registered while the context is open) that shows ``observer`` every write to
    the database files opened through it, as ``observer(offset, data)`` before the write.

    ``data`` is valid during the call only. Files are opened through it by name
    (``?vfs=<name>`` in a URI filename: :func:`fieldgate.store.connect_unjournaled`).
    """

    def __init__(self, observer: Observer, *, in_order: bool = False) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("libsqlite3 cannot be reached through ctypes")
        self._lib = lib
        self.observer = observer
        self.in_order = in_order
        self.name = f"fieldgate-tee-{next(_names)}"
        self.failure: BaseException | None = None
        self._files: dict[int, _Open] = {}
        self._methods: dict[int, _IoMethods] = {}  # ours, per original methods table
        self._base = lib.sqlite3_vfs_find(None)
        self._base_open = _OPEN(self._base.contents.xOpen)
        # Our callbacks: kept referenced for as long as SQLite may call them.
        self._callbacks = {
            "xOpen": _OPEN(self._open),
            "xClose": _CLOSE(self._close),
            "xRead": _READ(self._read),
            "xWrite": _WRITE(self._write),
            "xTruncate": _TRUNCATE(self._truncate),
            "xSync": _SYNC(self._sync),
            "xFileSize": _FILE_SIZE(self._file_size),
            "xFileControl": _FILE_CONTROL(self._file_control),
        }
        self._vfs = _Vfs.from_buffer_copy(self._base.contents)
        self._vfs.pNext = None
        self._zname = self.name.encode()
        self._vfs.zName = self._zname
        self._vfs.xOpen = ctypes.cast(self._callbacks["xOpen"], _ptr)
        self._registered = False

    def __enter__(self) -> TeeVfs:
        if self._lib.sqlite3_vfs_register(ctypes.byref(self._vfs), 0) != SQLITE_OK:
            raise RuntimeError(f"cannot register the SQLite VFS {self.name}")
        self._registered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._registered:
            self._lib.sqlite3_vfs_unregister(ctypes.byref(self._vfs))
            self._registered = False
        if self._files:  # a connection still open: its callbacks must outlive this context
            _kept.append(self)

    def raise_failure(self) -> None:
        """Raise what an observer raised inside a SQLite call, if anything."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    # -- the VFS and I/O methods (called by SQLite)

    def _failed(self, exc: BaseException) -> int:
        if self.failure is None:
            self.failure = exc
        return SQLITE_IOERR

    def _open(self, vfs: int, name: int, file: int, flags: int, out_flags: int) -> int:
        try:
            rc = self._base_open(ctypes.cast(self._base, _ptr), name, file, flags, out_flags)
            slot = ctypes.cast(file, ctypes.POINTER(_ptr))
            if rc != SQLITE_OK or not flags & SQLITE_OPEN_MAIN_DB or not slot[0]:
                return rc
            original = ctypes.cast(slot[0], ctypes.POINTER(_IoMethods)).contents
            ours = self._methods.get(slot[0])
            if ours is None:
                ours = _IoMethods.from_buffer_copy(original)
                ours.iVersion = min(original.iVersion, 2)  # no xFetch: no mapped reads
                for name_, callback in self._callbacks.items():
                    if name_ != "xOpen":
                        setattr(ours, name_, ctypes.cast(callback, _ptr))
                self._methods[slot[0]] = ours
            opened = _Open(original)
            size = ctypes.c_int64(0)
            if opened.file_size(file, ctypes.addressof(size)) == SQLITE_OK:
                opened.end = size.value
            self._files[file] = opened
            slot[0] = ctypes.addressof(ours)
            return rc
        except BaseException as exc:
            return self._failed(exc)

    def _flush(self, file: int, f: _Open) -> int:
        """Observe and write what is gathered."""
        if not f.length:
            return SQLITE_OK
        length, f.length = f.length, 0
        return self._put(file, f, f.address, memoryview(f.buffer)[:length], f.start)

    def _put(self, file: int, f: _Open, address: int, data: memoryview, offset: int) -> int:
        """Observe and write ``data`` (at ``address``) at ``offset``; with ``in_order``, a
        gap between the file's end and ``offset`` is filled with zeros first."""
        if self.in_order and offset + len(data) <= f.end:
            f.held.append((offset, bytes(data)))  # written when the file stops growing
            return SQLITE_OK
        while self.in_order and f.end < offset:
            n = min(GATHER_BYTES, offset - f.end)
            rc = f.write(file, ctypes.addressof(_ZEROS), n, f.end)
            if rc != SQLITE_OK:
                return rc
            f.end += n
        self.observer(offset, data)
        rc = f.write(file, address, len(data), offset)
        if rc == SQLITE_OK:
            f.end = max(f.end, offset + len(data))
        return rc

    def _write(self, file: int, data: int, amount: int, offset: int) -> int:
        try:
            f = self._files[file]
            if f.length and offset == f.start + f.length and f.length + amount <= GATHER_BYTES:
                ctypes.memmove(f.address + f.length, data, amount)
                f.length += amount
                return SQLITE_OK
            rc = self._flush(file, f)
            if rc != SQLITE_OK:
                return rc
            if amount > GATHER_BYTES:
                return self._put(file, f, data, memoryview(ctypes.string_at(data, amount)), offset)
            ctypes.memmove(f.address, data, amount)
            f.start, f.length = offset, amount
            return SQLITE_OK
        except BaseException as exc:
            return self._failed(exc)

    def _flushed(self, file: int) -> tuple[_Open, int]:
        """Write out what is gathered, then what was held (``in_order``)."""
        f = self._files[file]
        rc = self._flush(file, f)
        while rc == SQLITE_OK and f.held:
            offset, data = f.held.pop(0)
            self.observer(offset, memoryview(data))
            buffer = ctypes.create_string_buffer(data, len(data))
            rc = f.write(file, ctypes.addressof(buffer), len(data), offset)
        return f, rc

    def _close(self, file: int) -> int:
        try:
            f, rc = self._flushed(file)
            rc_close = f.close(file)
            del self._files[file]
            if rc != SQLITE_OK:  # SQLite ignores what a close returns: keep it to raise
                text = "database or disk is full" if rc == SQLITE_FULL else "disk I/O error"
                self._failed(sqlite3.OperationalError(f"{text} (writing at close)"))
            return rc if rc != SQLITE_OK else rc_close
        except BaseException as exc:
            return self._failed(exc)

    def _after_flush(self, file: int, call: Callable[[_Open], int]) -> int:
        """Write out what is gathered, then make the original call."""
        try:
            f, rc = self._flushed(file)
            return rc if rc != SQLITE_OK else call(f)
        except BaseException as exc:
            return self._failed(exc)

    def _read(self, file: int, data: int, amount: int, offset: int) -> int:
        return self._after_flush(file, lambda f: f.read(file, data, amount, offset))

    def _truncate(self, file: int, size: int) -> int:
        def truncate(f: _Open) -> int:
            rc = f.truncate(file, size)
            if rc == SQLITE_OK:
                f.end = min(f.end, size)
            return rc

        return self._after_flush(file, truncate)

    def _sync(self, file: int, flags: int) -> int:
        return self._after_flush(file, lambda f: f.sync(file, flags))

    def _file_size(self, file: int, size: int) -> int:
        return self._after_flush(file, lambda f: f.file_size(file, size))

    def _file_control(self, file: int, op: int, arg: int) -> int:
        return self._after_flush(file, lambda f: f.file_control(file, op, arg))
