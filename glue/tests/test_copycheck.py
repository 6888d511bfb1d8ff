"""What an export wrote, observed on the way out and compared with the device:
fieldgate.teevfs (SQLite's writes) and fieldgate.copycheck (the read-back)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from fieldgate import store, teevfs
from fieldgate.copycheck import (
    Copied,
    CopyDamaged,
    Written,
    check_bytes_on_device,
    check_on_device,
)
from fieldgate.errors import FieldgateError


def fill(db: Path, rows: int) -> None:
    conn = store.open_store(db, "GW-TEST")
    with store.transaction(conn):
        store.insert_readings(
            conn,
            ((f"TH-{i % 7:03d}", 1_700_000_000_000 + i * 1000, "temperature", i * 0.5)
             for i in range(rows)),
            source="mqtt",
        )  # fmt: skip
    conn.close()


def backup(db: Path, dest: Path, vfs: teevfs.TeeVfs | None = None) -> None:
    """SQLite's online backup of ``db`` into ``dest`` (through ``vfs`` when given)."""
    src = store.connect(db, readonly=True)
    dst = store.connect_unjournaled(dest, vfs=vfs.name if vfs else None)
    try:
        src.backup(dst, pages=-1)
    finally:
        dst.close()
        src.close()


def test_the_tee_sees_every_byte_sqlite_writes_and_changes_none(tmp_path: Path) -> None:
    assert teevfs.available()
    db = tmp_path / "store.db"
    fill(db, 40_000)
    seen: list[tuple[int, bytes]] = []
    with teevfs.TeeVfs(lambda offset, data: seen.append((offset, bytes(data)))) as vfs:
        backup(db, tmp_path / "tee.db", vfs)
    backup(db, tmp_path / "plain.db")
    copy = (tmp_path / "tee.db").read_bytes()
    assert copy == (tmp_path / "plain.db").read_bytes()
    # The observed writes, replayed in order, make the very same file.
    replay = bytearray()
    for offset, data in seen:
        replay[len(replay) : offset + len(data)] = bytes(max(0, offset + len(data) - len(replay)))
        replay[offset : offset + len(data)] = data
    assert bytes(replay) == copy
    # Consecutive page writes were gathered (SQLite writes one page per call).
    assert len(seen) < len(copy) // 4096 // 4
    assert max(len(d) for _, d in seen) == teevfs.GATHER_BYTES


def test_in_order_the_file_grows_front_to_back_and_is_written_into_only_at_the_end(
    tmp_path: Path,
) -> None:
    """What fusefat needs: no write past the end of the file (the gap is filled with zeros
    first), and no write inside the file while it still grows (SQLite's backup writes
    page 1 at its commit, before the last pages)."""
    db = tmp_path / "store.db"
    fill(db, 40_000)
    seen: list[tuple[int, bytes]] = []
    with teevfs.TeeVfs(
        lambda offset, data: seen.append((offset, bytes(data))), in_order=True
    ) as vfs:
        backup(db, tmp_path / "tee.db", vfs)
    backup(db, tmp_path / "plain.db")
    copy = (tmp_path / "tee.db").read_bytes()
    assert copy == (tmp_path / "plain.db").read_bytes()
    # SQLite's own order writes page 2 first and page 1 before the last pages:
    plain: list[int] = []
    with teevfs.TeeVfs(lambda offset, data: plain.append(offset)) as vfs:
        backup(db, tmp_path / "sqlite-order.db", vfs)
    assert plain[0] > 0 and plain.index(0) < len(plain) - 1
    # in order: every growing write starts at the end (the zero fill of page 1 is not
    # observed, so the first starts at page 2), and the writes inside come last
    end, inside = 4096, []
    for k, (offset, data) in enumerate(seen):
        if offset < end:
            inside.append(k)
        else:
            assert offset == end, (k, offset, end)
            end = offset + len(data)
    assert inside and inside == list(range(len(seen) - len(inside), len(seen)))
    assert end == len(copy)


def test_a_failing_observer_fails_the_backup_with_its_own_error(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    fill(db, 20_000)

    def observe(offset: int, data: memoryview) -> None:
        if offset > 100_000:
            raise ValueError("the observer broke")

    with teevfs.TeeVfs(observe) as vfs, pytest.raises(sqlite3.Error):
        backup(db, tmp_path / "copy.db", vfs)
    with pytest.raises(ValueError, match="the observer broke"):
        vfs.raise_failure()


def test_written_compares_pages_and_treats_holes_as_zeros(tmp_path: Path) -> None:
    written = Written(512)
    a, b = os.urandom(1024), os.urandom(512)
    written.record(0, a)
    written.record(2048, b)  # pages 2 and 3 were never written: zeros
    assert written.size == 2560
    assert written.first_page == a[:512]
    whole = a + bytes(1024) + b
    assert written.first_difference(0, whole) is None
    assert written.first_difference(512, whole[512:1536]) is None
    damaged = bytearray(whole)
    damaged[1600] ^= 1
    assert written.first_difference(0, damaged) == 3
    assert written.first_difference(0, whole + bytes(512)) == 5  # longer than written
    assert written.first_difference(0, whole + b"x") == 5  # a partial page beyond the end
    written.record(0, b * 2)  # a later write of a page wins
    assert written.first_difference(0, b * 2 + bytes(1024) + b) is None
    with pytest.raises(ValueError, match="not whole pages"):
        written.record(100, bytes(512))


def test_check_on_device_returns_the_hash_or_names_the_damage(tmp_path: Path) -> None:
    data = os.urandom(3 << 20) + bytes(4096)
    path = tmp_path / "copy.db"
    path.write_bytes(data)
    written = Written(4096)
    written.record(0, data)
    assert check_on_device(path, written) == hashlib.sha256(data).hexdigest()
    with path.open("r+b") as f:
        f.seek(2 * 4096 + 10)
        f.write(b"\x00" if data[2 * 4096 + 10] else b"\x01")
    with pytest.raises(CopyDamaged, match=r"differs .*: page 3 \(bytes 8192-12287\) of copy.db"):
        check_on_device(path, written)
    path.write_bytes(data[:-4096])
    with pytest.raises(CopyDamaged, match=f"has {len(data) - 4096} bytes, {len(data)} were"):
        check_on_device(path, written)
    small = tmp_path / "small.yaml"
    small.write_bytes(b"site: {}\n")
    check_bytes_on_device(small, b"site: {}\n")
    with pytest.raises(CopyDamaged, match=r"small\.yaml"):
        check_bytes_on_device(small, b"site: []\n")


def test_copied_compares_with_the_source_and_names_the_page(tmp_path: Path) -> None:
    source = bytearray(os.urandom(5 * 1024 + 512))

    def reread(offset: int, buffer: bytearray) -> int:
        part = source[offset : offset + len(buffer)]
        buffer[: len(part)] = part
        return len(part)

    copied = Copied(512, reread)
    for at in range(0, len(source), 2048):
        copied.record(source[at : at + 2048])
    assert copied.size == len(source)
    assert copied.first_page == source[:512]
    assert copied.first_difference(2048, memoryview(source)[2048:4096]) is None
    assert copied.first_difference(4096, bytes(source[4096:])) is None
    damaged = bytearray(source[2048:4096])
    damaged[1500] ^= 0x40
    assert copied.first_difference(2048, damaged) == 6  # (2048 + 1500) // 512, 0-based
    assert copied.first_difference(4096, bytes(source[4096:]) + bytes(512)) == 11  # longer
    path = tmp_path / "copy.db"
    path.write_bytes(source)
    assert check_on_device(path, copied) == hashlib.sha256(source).hexdigest()
    path.write_bytes(source[:3000] + bytes([source[3000] ^ 1]) + source[3001:])
    with pytest.raises(CopyDamaged, match=r"page 6 \(bytes 2560-3071\) of copy.db"):
        check_on_device(path, copied)
    hashed = Copied(512, reread)  # the source hashed beside the copy: the read-back is not
    hashed.hash_source(len(source))
    hashed.record(bytes(source))
    path.write_bytes(source)
    assert check_on_device(path, hashed) == hashlib.sha256(source).hexdigest()
    path.write_bytes(source[:3000] + bytes([source[3000] ^ 1]) + source[3001:])
    with pytest.raises(CopyDamaged, match=r"page 6 \(bytes 2560-3071\) of copy.db"):
        check_on_device(path, hashed)
    del source[5000:]  # the source itself shrank: nothing can be said about the copy
    with pytest.raises(FieldgateError, match="changed while it was held still"):
        copied.first_difference(4096, bytes(1536))
    hashed = Copied(512, reread)
    hashed.hash_source(5 * 1024 + 512)
    hashed.record(bytes(5 * 1024 + 512))
    with pytest.raises(FieldgateError, match="hashed over 5000 bytes, 5632 were copied"):
        hashed.source_sha256()
