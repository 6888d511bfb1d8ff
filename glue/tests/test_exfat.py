"""fieldgate.usb.exfat: a file's place on an exFAT device, found in the filesystem's own
structures on real images (exfatprogs' mkfs.exfat, written through exfat-fuse), and read
from the device with fieldgate.fsutil.read_extents."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from drives import Drives, drives

from fieldgate import fsutil
from fieldgate.usb import exfat

pytestmark = pytest.mark.root

__all__ = ["drives"]

STAGING = ".export-GW-TEST-20261206T090000+0000.partial"  # longer than one name entry
DB = "data_store-GW-TEST-20261206T090000+0000.db.partial"


def on_device(device: int, parts: list[str], size: int) -> tuple[bytes, int]:
    """The file's bytes as read from its extents on the device, and how many extents."""
    extents = exfat.file_extents(device, parts, size)
    return b"".join(bytes(chunk) for chunk in fsutil.read_extents(device, extents)), len(extents)


def test_files_are_found_and_read_from_their_clusters(drives: Drives) -> None:
    """A file in a subdirectory grown in turn with another (its clusters interleaved: a FAT
    chain), one grown alone (contiguous, NoFatChain), a directory of many entries (more
    than one cluster): each read from the device equals what was written."""
    drive = drives.make("exfat", files={"Password.txt": "x"})
    interleaved, alone = bytearray(), os.urandom(300_000)
    device = os.open(drive.loop, os.O_RDONLY)
    try:
        with drives.mount(drive.loop, "exfat") as root:
            (root / STAGING).mkdir()
            for k in range(150):  # three entries each: more than one 4 KiB cluster
                (root / STAGING / f"padding-file-number-{k:04d}.txt").write_bytes(b"%d" % k)
            with (root / STAGING / DB).open("wb") as a, (root / "other.bin").open("wb") as b:
                for _ in range(12):
                    block = os.urandom(3 * 4096 + 512)
                    a.write(block)
                    interleaved += block
                    a.flush()
                    os.fsync(a.fileno())
                    b.write(os.urandom(4096))
                    b.flush()
                    os.fsync(b.fileno())
            (root / "alone.bin").write_bytes(alone)
            fd = os.open(root / "alone.bin", os.O_RDONLY)
            os.fsync(fd)  # exfat-fuse writes every dirty entry, its bitmap, syncs the device
            os.close(fd)
            fsutil.flush_block_device(device)
            got, pieces = on_device(device, [STAGING, DB], len(interleaved))
            assert got == interleaved
            assert pieces > 1
            got, pieces = on_device(device, ["alone.bin"], len(alone))
            assert (got, pieces) == (alone, 1)
            got, _ = on_device(device, [STAGING, "padding-file-number-0149.txt"], 3)
            assert got == b"149"
    finally:
        os.close(device)


def test_what_is_not_certain_is_not_mapped(drives: Drives) -> None:
    """A length other than the file's, a name not there, a directory taken for a file, a
    damaged entry set, a filesystem that is not exFAT: NotMapped with the reason."""
    drive = drives.make("exfat", files={"Password.txt": "x", DB: b"y" * 10_000})
    other = drives.make("ext4")
    device = os.open(drive.loop, os.O_RDONLY)
    try:
        assert on_device(device, [DB], 10_000) == (b"y" * 10_000, 1)
        cases = [
            ([DB], 9_999, f"{DB} holds 10000 bytes on the device, not 9999"),
            (["missing.db"], 10, "missing.db is not in its directory on the device"),
            ([DB, "x"], 10, f"{DB} is not a directory"),
        ]
        for parts, size, reason in cases:
            with pytest.raises(exfat.NotMapped) as caught:
                exfat.file_extents(device, parts, size)
            assert str(caught.value) == reason
    finally:
        os.close(device)
    # One byte of the file's name changed in the image: its entry set's checksum fails.
    with drive.image.open("r+b") as f, mmap.mmap(f.fileno(), 0) as image:
        where = image.find(DB[:15].encode("utf-16-le"))
        assert where > 0
        image[where] ^= 0x01
        image.flush()
    with (
        drive.image.open("rb") as f,
        pytest.raises(exfat.NotMapped, match="entry set's checksum does not match"),
    ):
        exfat.file_extents(f.fileno(), [DB], 10_000)
    device = os.open(other.loop, os.O_RDONLY)
    try:
        with pytest.raises(exfat.NotMapped, match=r"^not an exFAT filesystem$"):
            exfat.file_extents(device, [DB], 10_000)
    finally:
        os.close(device)


def test_the_boot_region_checksum_is_checked(drives: Drives, tmp_path: Path) -> None:
    drive = drives.make("exfat")
    image = tmp_path / "copy.img"
    image.write_bytes(drive.image.read_bytes()[: 1 << 20])
    with image.open("r+b") as f:
        f.seek(100)  # the volume serial number: covered by the checksum
        f.write(b"\x00\x01\x02\x03")
        f.flush()
        with pytest.raises(exfat.NotMapped, match="boot region's checksum does not match"):
            exfat.Volume(f.fileno())


def entry_set(name: str, *extra: bytes) -> bytes:
    """A file's directory entry set as exfat-fuse writes it, with ``extra`` secondaries."""
    units = name.encode("utf-16-le")
    names = [
        bytes([exfat.NAME, 0]) + units[k : k + 30].ljust(30, b"\0")
        for k in range(0, len(units), 30)
    ]
    stream = bytearray(32)
    stream[0], stream[1], stream[3] = exfat.STREAM, 0x03, len(name)
    stream[8:16] = stream[24:32] = (8192).to_bytes(8, "little")
    stream[20:24] = (5).to_bytes(4, "little")
    secondaries = [bytes(stream), *names, *extra]
    first = bytearray(32)
    first[0], first[1] = exfat.FILE, len(secondaries)
    data = bytearray(first + b"".join(secondaries))
    data[2:4] = exfat.set_checksum(bytes(data)).to_bytes(2, "little")
    return bytes(data)


def test_entry_sets_with_vendor_entries_parse_and_unknown_ones_do_not() -> None:
    entry = exfat.Entry.parse(entry_set(DB))
    assert entry == exfat.Entry(DB, False, 5, 8192, 8192, True)
    vendor = bytes([0xE0]) + bytes(31)
    assert exfat.Entry.parse(entry_set(DB, vendor)) == entry
    with pytest.raises(exfat.NotMapped, match="secondary entries not known here"):
        exfat.Entry.parse(entry_set(DB, bytes([0xC2]) + bytes(31)))
    with pytest.raises(exfat.NotMapped, match="without its whole name"):
        exfat.Entry.parse(entry_set(DB)[: 3 * 32])
