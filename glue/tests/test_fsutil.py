"""Filesystem helpers (fieldgate.fsutil): atomic writes, hashes, mounts, sizes."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from fieldgate import fsutil


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_text("old\n")
    fsutil.atomic_write(target, b"new\n", mode=0o600)
    assert target.read_bytes() == b"new\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.write_bytes(b"intact")
    tmp = tmp_path / ".tmp-data"
    tmp.write_bytes(b"left by a crash")
    with pytest.raises(RuntimeError), fsutil.atomic_file(target, tmp=tmp) as f:
        f.write(b"half")
        raise RuntimeError("power cut")
    assert target.read_bytes() == b"intact"
    assert not tmp.exists()


def test_write_new_refuses_an_existing_file_and_links(tmp_path: Path) -> None:
    fsutil.write_new(tmp_path / "a", b"x")
    with pytest.raises(FileExistsError):
        fsutil.write_new(tmp_path / "a", b"y")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        fsutil.write_new(tmp_path / "link", b"y")
    assert not (tmp_path / "elsewhere").exists()


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert fsutil.sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()


def test_mounts_parse_escapes_and_types(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 8:17 / /media/usb\\040stick rw,nosuid - fuse.fusefat /dev/sdb1 rw\n"
        "garbage\n"
    )
    assert fsutil.mounts(info) == [
        fsutil.Mount("/", "ext4", "/dev/sda1"),
        fsutil.Mount("/media/usb stick", "fuse.fusefat", "/dev/sdb1"),
    ]
    assert fsutil.mounts(tmp_path / "missing") == []
    assert not fsutil.is_block_device("/dev/null")
    assert not fsutil.is_block_device(tmp_path / "missing")


def test_filesystem_type_and_mount_points_of_this_machine(tmp_path: Path) -> None:
    assert "/" in fsutil.mount_points()
    assert fsutil.is_mounted("/")
    assert fsutil.filesystem_type(tmp_path) != ""


def test_disk_usage_and_free_bytes(tmp_path: Path) -> None:
    assert 0.0 <= fsutil.disk_usage_percent(tmp_path) <= 100.0
    assert fsutil.free_bytes(tmp_path) >= 0


@pytest.mark.parametrize(
    ("n", "units", "text"),
    [
        (0, fsutil.IEC_UNITS, "0 B"),
        (1023, fsutil.IEC_UNITS, "1023 B"),
        (1536, fsutil.IEC_UNITS, "1.5 KiB"),
        (7.4 * 1024**3, fsutil.IEC_UNITS, "7.4 GiB"),
        (3 * 1024**4, fsutil.IEC_UNITS, "3072.0 GiB"),
        (512, ("bytes", "kB", "MB"), "512 bytes"),
        (6.1 * 1024**2, ("bytes", "kB", "MB"), "6.1 MB"),
        (5 * 1024**3, ("bytes", "kB", "MB"), "5120.0 MB"),
    ],
)
def test_human_bytes(n: float, units: tuple[str, ...], text: str) -> None:
    assert fsutil.human_bytes(n, units) == text


def test_read_from_device_returns_the_file_in_chunks(tmp_path: Path) -> None:
    data = os.urandom((3 << 20) + 1234)  # not a multiple of the chunk or of a block
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    chunks = [bytes(c) for c in fsutil.read_from_device(path, chunk=1 << 20)]
    assert [len(c) for c in chunks] == [1 << 20] * 3 + [1234]
    assert b"".join(chunks) == data
    with pytest.raises(FileNotFoundError):
        next(fsutil.read_from_device(tmp_path / "missing.bin"))


def test_read_from_device_drops_the_cache_where_direct_io_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem without O_DIRECT: the file is read after dropping its cached pages."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 5000)
    real_open = os.open
    dropped: list[int] = []

    def no_direct(p: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    monkeypatch.setattr(fsutil, "drop_cached_pages", dropped.append)
    assert b"".join(bytes(c) for c in fsutil.read_from_device(path)) == b"abc" * 5000
    assert len(dropped) == 1


def test_load_small_json_names_each_cause(tmp_path: Path) -> None:
    def parse(data: Any) -> dict[str, Any]:
        return {"state": "read", "n": int(data["n"])}

    path = tmp_path / "record.json"

    def load() -> dict[str, Any]:
        return fsutil.load_small_json(str(path), 64, "a record", parse, {"n": 0})

    file = str(path)
    assert load() == {"file": file, "state": "none", "n": 0}
    path.write_text('{"n": 3}')
    assert load() == {"file": file, "state": "read", "n": 3}
    for text, error in (
        ("x" * 65, "not a record (larger than 64 bytes)"),
        ("{", "not a record (Expecting property name enclosed in double quotes: "),
        ('{"n": "many"}', "not a record (invalid literal for int() with base 10: 'many')"),
        ("[1]", "not a record (list indices must be integers or slices, not str)"),
    ):
        path.write_text(text)
        got = load()
        assert (got["state"], got["error"][: len(error)]) == ("unreadable", error), text
    path.unlink()
    path.mkdir()  # cannot be read as a file
    assert load() == {"file": file, "state": "unreadable", "error": "Is a directory"}


def test_read_extents_returns_the_bytes_of_each_range_in_order(tmp_path: Path) -> None:
    """Ranges that do not start or end on a block boundary, one longer than a chunk, the
    last one past the end of the file (cut short, and the reading stops there)."""
    data = os.urandom(300_000)
    image = tmp_path / "image"
    image.write_bytes(data)
    extents = [(5000, 70_000), (100, 3), (200_000, 99_000), (299_990, 50)]
    fd = os.open(image, os.O_RDONLY)
    try:
        chunks = [bytes(c) for c in fsutil.read_extents(fd, extents, chunk=1 << 15)]
    finally:
        os.close(fd)
    assert max(len(c) for c in chunks) == 1 << 15
    got = b"".join(chunks)
    assert got == data[5000:75_000] + data[100:103] + data[200_000:299_000] + data[299_990:]
