"""Where a file's bytes lie on an exFAT block device, read from the device's own structures.

Under exfat-fuse the export's read-back through the mount goes through the FUSE driver,
which reads the copy back at its own speed (about 4 times as long as a kernel read here). The driver
writes a file's data straight into its clusters on the device, so after its ``fsync``
(every dirty directory entry, the allocation bitmap and the device synced; ``fuse/main.c``
of relan/exfat) the copy can be read from the device itself at the places the
filesystem's structures name (Microsoft's "exFAT file system specification"):

- the boot sector: ``EXFAT   ``, the bytes-per-sector and sectors-per-cluster shifts, the
  FAT's and the cluster heap's offsets, the cluster count, the root directory's first
  cluster; its checksum sector (sector 11) must match sectors 0 to 10;
- directory entry sets: a file entry (0x85, the set's checksum), its stream extension
  (0xC0: first cluster, valid data length, data length, ``NoFatChain``) and file name
  entries (0xC1); every set checked against its checksum;
- the FAT, for a file or directory without ``NoFatChain`` (the root directory always).

:func:`file_extents` walks the path from the root directory and returns the file's byte
ranges on the device, in file order. Anything it is not sure of — not exFAT, a checksum
that does not match, a cluster out of range, a chain of the wrong length or a loop, a
name not found, a valid data length short of the data length, a length other than the
one expected — raises :class:`NotMapped` with the reason, and the caller reads through
the mount as before. A wrong map could only make the comparison with the source fail
(an error), never pass: the bytes read there are compared with what was written.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from fieldgate.errors import FieldgateError

SIGNATURE = b"EXFAT   "
ENTRY = 32
END_OF_CHAIN = 0xFFFFFFFF
FIRST_CLUSTER = 2
#: The FAT is read in blocks of this many bytes.
FAT_BLOCK = 4096
#: A directory larger than this is not walked (the export's are a few entries).
MAX_DIR_BYTES = 64 << 20

FILE, STREAM, NAME = 0x85, 0xC0, 0xC1
ATTR_DIRECTORY = 0x10
NO_FAT_CHAIN = 0x02
#: Secondary entries from this type on may follow the names (vendor extensions).
BENIGN = 0xE0


class NotMapped(FieldgateError):
    """The file's place on the device could not be established with certainty."""


def _checksum32(data: bytes, skip: tuple[int, ...]) -> int:
    total = 0
    for i, byte in enumerate(data):
        if i in skip:
            continue
        total = ((((total & 1) << 31) | (total >> 1)) + byte) & 0xFFFFFFFF
    return total


def set_checksum(entries: bytes) -> int:
    """The checksum of a directory entry set (its first entry's bytes 2 and 3 left out)."""
    total = 0
    for i, byte in enumerate(entries):
        if i in (2, 3):
            continue
        total = ((((total & 1) << 15) | (total >> 1)) + byte) & 0xFFFF
    return total


class Volume:
    """An exFAT volume on an open block device (or image) ``fd``, read with ``os.pread``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        boot = self._read(0, 512)
        if boot[3:11] != SIGNATURE or boot[510:512] != b"\x55\xaa":
            raise NotMapped("not an exFAT filesystem")
        (
            volume_length,
            fat_offset,
            fat_length,
            heap_offset,
            cluster_count,
            root_cluster,
        ) = struct.unpack_from("<QIIIII", boot, 72)
        sector_shift, cluster_shift, fats = boot[108], boot[109], boot[110]
        if not 9 <= sector_shift <= 12 or sector_shift + cluster_shift > 25:
            raise NotMapped(f"sector shift {sector_shift}, cluster shift {cluster_shift}")
        if fats != 1:
            raise NotMapped(f"{fats} FATs")
        self.sector = 1 << sector_shift
        region = self._read(0, 12 * self.sector)
        expected = _checksum32(region[: 11 * self.sector], skip=(106, 107, 112))
        stored = struct.unpack_from(f"<{self.sector // 4}I", region, 11 * self.sector)
        if any(x != expected for x in stored):
            raise NotMapped("the boot region's checksum does not match")
        self.cluster = self.sector << cluster_shift
        self.volume_bytes = volume_length * self.sector
        self.fat_offset = fat_offset * self.sector
        self.heap_offset = heap_offset * self.sector
        self.cluster_count = cluster_count
        self.root_cluster = root_cluster
        if fat_length * self.sector < (cluster_count + FIRST_CLUSTER) * 4:
            raise NotMapped("the FAT is shorter than the cluster count needs")
        if self.heap_offset + cluster_count * self.cluster > self.volume_bytes:
            raise NotMapped("the cluster heap reaches past the volume")
        self._fat: dict[int, bytes] = {}

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise NotMapped(f"the device ended at {offset + len(data)} bytes")
        return data

    def _valid(self, cluster: int) -> bool:
        return FIRST_CLUSTER <= cluster < FIRST_CLUSTER + self.cluster_count

    def _next(self, cluster: int) -> int:
        """The FAT's entry for ``cluster`` (read a block at a time, as a chain needs it)."""
        block, at = divmod(cluster * 4, FAT_BLOCK)
        data = self._fat.get(block)
        if data is None:
            data = self._fat[block] = self._read(self.fat_offset + block * FAT_BLOCK, FAT_BLOCK)
        return int.from_bytes(data[at : at + 4], "little")

    def clusters(self, first: int, count: int | None, contiguous: bool) -> list[int]:
        """The clusters of a chain starting at ``first``: ``count`` of them, contiguous or
        through the FAT (then ending exactly where the FAT says it ends); with ``count``
        None (a directory without a stream extension: the root) the whole FAT chain."""
        if not self._valid(first):
            raise NotMapped(f"cluster {first} is outside the cluster heap")
        if contiguous:
            if count is None or not self._valid(first + count - 1):
                raise NotMapped(f"{count} contiguous clusters from {first} leave the heap")
            return list(range(first, first + count))
        chain = [first]
        limit = self.cluster_count if count is None else count
        while True:
            nxt = self._next(chain[-1])
            if nxt == END_OF_CHAIN:
                break
            if not self._valid(nxt) or len(chain) >= limit:
                raise NotMapped(f"the FAT chain from cluster {first} is broken or too long")
            chain.append(nxt)
        if count is not None and len(chain) != count:
            raise NotMapped(f"the FAT chain from cluster {first} has {len(chain)} clusters")
        return chain

    def extents(self, clusters: list[int], length: int) -> list[tuple[int, int]]:
        """The byte ranges (device offset, length) of the first ``length`` bytes of
        ``clusters``, neighbouring clusters merged."""
        spans: list[tuple[int, int]] = []
        left = length
        for c in clusters:
            if left <= 0:
                break
            start, size = (
                self.heap_offset + (c - FIRST_CLUSTER) * self.cluster,
                min(self.cluster, left),
            )
            if spans and spans[-1][0] + spans[-1][1] == start:
                spans[-1] = (spans[-1][0], spans[-1][1] + size)
            else:
                spans.append((start, size))
            left -= size
        return spans

    def _read_chain(self, clusters: list[int], length: int) -> bytes:
        return b"".join(self._read(at, n) for at, n in self.extents(clusters, length))

    def lookup(self, dir_clusters: list[int], dir_bytes: int, name: str) -> Entry:
        """The entry set named exactly ``name`` in a directory."""
        if dir_bytes > MAX_DIR_BYTES:
            raise NotMapped(f"a directory of {dir_bytes} bytes")
        data = self._read_chain(dir_clusters, dir_bytes)
        at = 0
        while at + ENTRY <= len(data):
            kind = data[at]
            if kind == 0x00:  # the end of the directory
                break
            if kind != FILE:
                at += ENTRY
                continue
            count = data[at + 1]
            entries = data[at : at + (1 + count) * ENTRY]
            if count < 2 or len(entries) != (1 + count) * ENTRY:
                raise NotMapped("a file entry set is cut short")
            if set_checksum(entries) != int.from_bytes(entries[2:4], "little"):
                raise NotMapped("a directory entry set's checksum does not match")
            entry = Entry.parse(entries)
            if entry.name == name:
                return entry
            at += len(entries)
        raise NotMapped(f"{name} is not in its directory on the device")

    def file_extents(self, parts: list[str], size: int) -> list[tuple[int, int]]:
        """Where the file at ``parts`` (path components from the root) lies: its byte
        ranges in file order, covering exactly ``size`` bytes. NotMapped otherwise."""
        if not parts:
            raise NotMapped("no file named")
        clusters = self.clusters(self.root_cluster, None, contiguous=False)
        dir_bytes = len(clusters) * self.cluster
        for k, part in enumerate(parts):
            entry = self.lookup(clusters, dir_bytes, part)
            last = k == len(parts) - 1
            if entry.directory == last:
                raise NotMapped(f"{part} is {'a' if entry.directory else 'not a'} directory")
            if entry.valid_length != entry.length:
                raise NotMapped(
                    f"{part}: valid data length {entry.valid_length}, data length {entry.length}"
                )
            if last and entry.length != size:
                raise NotMapped(f"{part} holds {entry.length} bytes on the device, not {size}")
            if entry.length == 0:
                raise NotMapped(f"{part} is empty on the device")
            count = -(-entry.length // self.cluster)
            clusters = self.clusters(entry.first_cluster, count, entry.contiguous)
            dir_bytes = entry.length
        return self.extents(clusters, size)


@dataclass(frozen=True)
class Entry:
    """The parts of a file's directory entry set the walk needs."""

    name: str
    directory: bool
    first_cluster: int
    valid_length: int
    length: int
    contiguous: bool

    @classmethod
    def parse(cls, entries: bytes) -> Entry:
        """A checked entry set: the file entry, the stream extension, the name entries."""
        attributes = int.from_bytes(entries[4:6], "little")
        stream = entries[ENTRY : 2 * ENTRY]
        if stream[0] != STREAM:
            raise NotMapped("a file entry without its stream extension")
        flags, name_length = stream[1], stream[3]
        valid_length, first_cluster, length = struct.unpack_from("<Q4xIQ", stream, 8)
        secondaries = [entries[at : at + ENTRY] for at in range(2 * ENTRY, len(entries), ENTRY)]
        names = secondaries[: -(-name_length // 15)]
        if not name_length or len(names) * 15 < name_length or any(n[0] != NAME for n in names):
            raise NotMapped("a file entry set without its whole name")
        if any(e[0] < BENIGN for e in secondaries[len(names) :]):
            raise NotMapped("a file entry set with secondary entries not known here")
        raw = b"".join(n[2:ENTRY] for n in names)[: name_length * 2]
        try:
            name = raw.decode("utf-16-le")
        except UnicodeDecodeError:
            name = ""
        return cls(
            name,
            bool(attributes & ATTR_DIRECTORY),
            first_cluster,
            valid_length,
            length,
            bool(flags & NO_FAT_CHAIN),
        )


def file_extents(fd: int, parts: list[str], size: int) -> list[tuple[int, int]]:
    """Where the ``size`` bytes of the file at path ``parts`` lie on the exFAT device ``fd``:
    (device offset, length) in file order. NotMapped (with the reason) when not certain."""
    return Volume(fd).file_extents(parts, size)
