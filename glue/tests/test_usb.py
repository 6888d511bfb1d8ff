"""USB export end to end: real images on loop devices, the real ``usb-watch`` daemon and
``usb-event`` command, real mounts (ext4 by the kernel, FAT and exFAT through FUSE)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from drives import PASSWORD, Drive, Drives, drives
from support import (
    ConfigFactory,
    count_rows,
    run_fieldgate,
    start_fieldgate,
    stop_process,
    wait_until,
)

from fieldgate import fsutil, store
from fieldgate.daemon import StopFlag
from fieldgate.export import TS_FORMAT
from fieldgate.led import read_pattern
from fieldgate.usb.spool import normalize_devname, pending_events
from fieldgate.usb.watcher import Watcher

pytestmark = pytest.mark.root

__all__ = ["drives"]

FINAL_RE = re.compile(
    r"^(data_store-GW-TEST-(\d{8}T\d{6}\+0000)\.db|site_config-GW-TEST-(\d{8}T\d{6}\+0000)\.yaml"
    r"|export-GW-TEST-(\d{8}T\d{6}\+0000)\.sha256)$"
)


def fill_store(db: Path, rows: int, *, start_ts: int = 1_700_000_000_000) -> set[tuple]:
    """Readings in the gateway store, as the collector would have stored them."""
    conn = store.open_store(db, "GW-TEST")
    data = [("TH-001", start_ts + i * 1000, "temperature", float(i % 50)) for i in range(rows)]
    with store.transaction(conn):
        store.insert_readings(conn, data, source="mqtt")
    conn.close()
    return {(d, ts, m) for d, ts, m, _ in data}


def readings_in(db: Path) -> set[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return set(conn.execute("SELECT device, ts, metric FROM readings"))
    finally:
        conn.close()


class Watch:
    """A running ``fieldgate usb-watch`` and the paths it works with."""

    def __init__(self, config: Path) -> None:
        self.config = config
        cfg = yaml.safe_load(config.read_text())
        self.log = Path(cfg["export"]["log_file"])
        self.led = Path(cfg["export"]["led_path"])
        self.spool = Path(cfg["export"]["spool_dir"])
        self.mount_dir = Path(cfg["export"]["mount_dir"])
        self.store = Path(cfg["store"]["path"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = config.parent / "usb-watch.out"

    def start(self) -> None:
        self.proc = start_fieldgate("usb-watch", config=self.config, log=self.output)
        wait_until(lambda: "led: normal_operation" in self.text(), 30, what="usb-watch start")

    def stop(self) -> int:
        assert self.proc is not None
        return stop_process(self.proc)

    def event(self, action: str, dev: str) -> None:
        r = run_fieldgate("usb-event", action, dev, config=self.config)
        assert r.returncode == 0, r.stderr

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def lines(self) -> list[str]:
        return [line.split(" ", 1)[1] for line in self.text().splitlines()]

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        rx = re.compile(pattern)
        wait_until(lambda: any(rx.search(x) for x in self.lines()), timeout, what=pattern)

    def result(self, dev: str, timeout: float = 180) -> str:
        """Wait for the outcome line of an export to ``dev`` and return it."""
        rx = re.compile(rf"^{re.escape(dev)}: (success|error): ")
        self.wait_for(rx.pattern, timeout)
        return next(x for x in self.lines() if rx.search(x))

    def wait_led(self, state: str, timeout: float = 30) -> None:
        wait_until(lambda: read_pattern(self.led) == state, timeout, what=f"LED {state}")

    def led_history(self) -> list[str]:
        return [x.removeprefix("led: ") for x in self.lines() if x.startswith("led: ")]


@pytest.fixture
def watch(config_file: ConfigFactory) -> Iterator[Watch]:
    w = Watch(config_file())
    yield w
    if w.proc is not None and w.proc.poll() is None:
        w.stop()


#: How the export reads the snapshot back from each kind of drive (its log line).
READ_BACK = {
    "ext4": "snapshot and site config read back from the drive",
    "vfat": "the snapshot is read back through the driver (not an exFAT filesystem)",
    "exfat": "snapshot found in the exFAT structures on the device (one extent) in ",
}


def finals(files: dict[str, bytes]) -> list[str]:
    return sorted(n for n in files if FINAL_RE.match(n))


def check_export(files: dict[str, bytes], dest: Path, expected: set[tuple]) -> str:
    """The three files are there, verify with sha256sum -c, and hold every reading."""
    names = finals(files)
    assert len(names) == 3, names
    ts = {
        FINAL_RE.match(n).group(2) or FINAL_RE.match(n).group(3) or FINAL_RE.match(n).group(4)
        for n in names
    }  # type: ignore[union-attr]
    assert len(ts) == 1
    (stamp,) = ts
    time.strptime(stamp, TS_FORMAT)
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        (dest / n).write_bytes(files[n])
    p = subprocess.run(
        ["sha256sum", "-c", f"export-GW-TEST-{stamp}.sha256"],
        cwd=dest,
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(": OK") == 2
    db = dest / f"data_store-GW-TEST-{stamp}.db"
    out = subprocess.run(
        ["sqlite3", str(db), "PRAGMA integrity_check;"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "ok"
    assert expected <= readings_in(db)
    config = (dest / f"site_config-GW-TEST-{stamp}.yaml").read_text()
    parsed = yaml.safe_load(config)
    assert parsed["site"]["serial"] == "GW-TEST"
    assert "password_file" not in parsed["mqtt"]
    assert "password_file" not in parsed["export"]
    assert "key_file" not in parsed["upload"]
    for secret in (PASSWORD, "collector-secret", "not-registered-yet", "/secrets/"):
        assert secret not in config
    return stamp


@pytest.mark.parametrize("fstype", ["ext4", "vfat", "exfat"])
def test_export_to_a_drive_with_the_right_password(
    watch: Watch, drives: Drives, tmp_path: Path, fstype: str
) -> None:
    expected = fill_store(watch.store, 3000)
    drive = drives.make(fstype, files={"Password.txt": f"  {PASSWORD}\r\n"})
    watch.start()
    watch.event("add", f"/dev/{drive.devname}")
    assert watch.result(drive.devname).startswith(f"{drive.devname}: success"), watch.text()
    watch.wait_led("success")
    status = run_fieldgate("status", "--json", config=watch.config)
    assert '"value": "success"' in status.stdout
    watch.event("remove", drive.devname)
    watch.wait_for(rf"^{drive.devname}: drive removed")
    watch.wait_led("normal_operation")
    assert watch.led_history() == ["normal_operation", "in_progress", "success", "normal_operation"]
    assert watch.stop() == 0
    files = drives.listing(drive)
    check_export(files, tmp_path / "copy", expected)
    assert files["Password.txt"] == f"  {PASSWORD}\r\n".encode()
    assert not [n for n in files if n.startswith(".")], "staging left behind"
    text = watch.text()
    assert PASSWORD not in text
    for step in (
        "filesystem",
        "mounted",
        "Password.txt matches",
        "free space ok",
        "snapshot ",
        "read back from the drive and compared with what was written",
        "checksum file written, synced and read back",
        "renamed into place",
        "unmounted",
        READ_BACK[fstype],
    ):
        assert step in text, step
    assert not list(watch.mount_dir.iterdir()), "mount point left behind"


@pytest.mark.parametrize(
    ("files", "cause"),
    [
        ({"Password.txt": "not-the-password\n"}, "wrong password in Password.txt"),
        ({"README.txt": "hello\n"}, "no Password.txt at the root"),
    ],
)
def test_drive_without_the_right_password_is_an_error(
    watch: Watch, drives: Drives, files: dict[str, str], cause: str
) -> None:
    fill_store(watch.store, 100)
    drive = drives.make("ext4", files=files)
    watch.start()
    watch.event("add", drive.devname)
    watch.wait_for(rf"^{drive.devname}: error: no partition qualifies")
    assert cause in watch.text()
    watch.wait_led("error")
    watch.event("remove", drive.devname)
    watch.wait_for(rf"^{drive.devname}: drive removed")
    watch.wait_led("normal_operation")  # logged before the LED is set, after the removal
    assert watch.led_history() == ["normal_operation", "in_progress", "error", "normal_operation"]
    watch.stop()
    after = drives.listing(drive)
    assert {k: v.decode() for k, v in after.items()} == files


def fake_partitioned_drive(root: Path, drive: str, parts: list[Drive]) -> Path:
    """A stand-in for /sys/class/block describing one drive whose partitions are ``parts``.

    This kernel does not partition loop devices (no partition table support), so the
    partitions are separate loop devices with real filesystems and real device nodes;
    only the sysfs topology that groups them into one drive is written here.
    """
    sys_block = root / "sys-class-block"
    disk = sys_block / drive
    disk.mkdir(parents=True)
    for number, part in enumerate(parts, start=1):
        entry = disk / part.devname
        entry.mkdir()
        (entry / "partition").write_text(f"{number}\n")
        (sys_block / part.devname).symlink_to(entry)
    return sys_block


def in_process_watcher(config: Path, sys_block: Path) -> Watcher:
    from fieldgate.config import load_config

    w = Watcher(load_config(str(config)), StopFlag(), sys_block=sys_block)
    w.start()
    return w


def test_several_partitions_none_qualifies(
    config_file: ConfigFactory, drives: Drives, tmp_path: Path
) -> None:
    config = config_file()
    watch = Watch(config)
    fill_store(watch.store, 100)
    p1 = drives.make("ext4", files={"Password.txt": "wrong\n"})
    p2 = drives.make("vfat", files={"README.txt": "no password here\n"})
    w = in_process_watcher(config, fake_partitioned_drive(tmp_path, "sdq", [p1, p2]))
    try:
        w.added(p1.devname)
        w.added(p2.devname)  # udev reports every partition; the drive was examined already
        line = next(x for x in watch.lines() if "no partition qualifies" in x)
        assert line.startswith("sdq: error: ")
        assert f"{p1.devname}: wrong password in Password.txt" in line
        assert f"{p2.devname}: no Password.txt at the root" in line
        assert f"{p2.devname}: drive sdq was examined already (error)" in watch.text()
        assert read_pattern(watch.led) == "error"
        w.removed(p2.devname)
        assert read_pattern(watch.led) == "normal_operation"
        assert watch.led_history() == [
            "normal_operation",
            "in_progress",
            "error",
            "normal_operation",
        ]
    finally:
        w.log.close()
    assert set(drives.listing(p1)) == {"Password.txt"}
    assert set(drives.listing(p2)) == {"README.txt"}


def test_second_partition_qualifies(
    config_file: ConfigFactory, drives: Drives, tmp_path: Path
) -> None:
    config = config_file()
    watch = Watch(config)
    expected = fill_store(watch.store, 500)
    p1 = drives.make("exfat", files={"notes.txt": "x"})
    p2 = drives.make("ext4", files={"Password.txt": PASSWORD})
    w = in_process_watcher(config, fake_partitioned_drive(tmp_path, "sdr", [p1, p2]))
    try:
        w.added(p1.devname)
        assert f"{p1.devname}: does not qualify: no Password.txt" in watch.text()
        assert any(x.startswith(f"{p2.devname}: success") for x in watch.lines())
        assert read_pattern(watch.led) == "success"
    finally:
        w.log.close()
    check_export(drives.listing(p2), tmp_path / "copy", expected)
    assert set(drives.listing(p1)) == {"notes.txt"}


def test_too_little_space(watch: Watch, drives: Drives) -> None:
    fill_store(watch.store, 200_000)  # about 16 MiB
    drive = drives.make("ext4", size_mb=8, files={"Password.txt": PASSWORD})
    watch.start()
    watch.event("add", drive.devname)
    watch.wait_for(rf"^{drive.devname}: error: not enough free space")
    watch.wait_led("error")
    watch.stop()
    assert set(drives.listing(drive)) == {"Password.txt"}


def test_write_protected_drive(watch: Watch, drives: Drives) -> None:
    fill_store(watch.store, 100)
    drive = drives.make("ext4", readonly=True, files={"Password.txt": PASSWORD})
    watch.start()
    watch.event("add", drive.devname)
    watch.wait_for(rf"^{drive.devname}: error: .*read-only")
    watch.wait_led("error")
    watch.stop()
    assert set(drives.listing(drive)) == {"Password.txt"}


def test_old_exports_stay_and_same_second_gets_a_new_name(
    watch: Watch, drives: Drives, tmp_path: Path
) -> None:
    expected = fill_store(watch.store, 1000)
    now = time.time()
    # Old exports of this gateway for this second and the next two: the new export must
    # not touch them and must take a later, free timestamp.
    old = {}
    for k in range(3):
        stamp = time.strftime("%Y%m%dT%H%M%S+0000", time.gmtime(now + k))
        for pattern in (
            "data_store-GW-TEST-{}.db",
            "site_config-GW-TEST-{}.yaml",
            "export-GW-TEST-{}.sha256",
        ):
            old[pattern.format(stamp)] = f"old export {k}\n".encode()
    drive = drives.make("ext4", files={"Password.txt": PASSWORD, **old, "notes.txt": b"mine"})
    watch.start()
    watch.event("add", drive.devname)
    assert watch.result(drive.devname).startswith(f"{drive.devname}: success"), watch.text()
    watch.stop()
    files = drives.listing(drive)
    for name, data in old.items():
        assert files.pop(name) == data
    assert files["notes.txt"] == b"mine"
    stamp = check_export(files, tmp_path / "copy", expected)
    assert stamp not in {n.split("-")[-1].split(".")[0] for n in old}


def test_drive_inserted_during_an_export_waits_its_turn(
    watch: Watch, drives: Drives, tmp_path: Path
) -> None:
    expected = fill_store(watch.store, 200_000)
    first = drives.make("vfat", size_mb=96, files={"Password.txt": PASSWORD})
    second = drives.make("ext4", files={"Password.txt": PASSWORD})
    watch.start()
    watch.event("add", first.devname)
    watch.wait_for(rf"^{first.devname}: writing export")
    watch.event("add", second.devname)
    assert watch.result(second.devname).startswith(f"{second.devname}: success"), watch.text()
    lines = watch.lines()
    done_first = next(i for i, x in enumerate(lines) if x.startswith(f"{first.devname}: success"))
    start_second = next(i for i, x in enumerate(lines) if x.startswith(f"{second.devname}: drive"))
    assert done_first < start_second
    watch.event("remove", first.devname)
    watch.wait_for(rf"^{first.devname}: drive removed")
    assert read_pattern(watch.led) == "success"  # the second drive still holds its result
    watch.event("remove", second.devname)
    watch.wait_for(rf"^{second.devname}: drive removed")
    watch.wait_led("normal_operation")
    watch.stop()
    check_export(drives.listing(first), tmp_path / "a", expected)
    check_export(drives.listing(second), tmp_path / "b", expected)


def test_device_failing_mid_export(watch: Watch, drives: Drives, tmp_path: Path) -> None:
    """The drive's block device starts failing every I/O in the middle of the export.

    The loop device is backed by a file on a FUSE pass-through (bindfs). Once the export
    has begun writing, bindfs is frozen (SIGSTOP: every read and write of the device
    blocks, like a stick being pulled mid-transfer) and then killed (every I/O fails with
    an error, like a vanished device), and the remove event is delivered as udev would.
    """
    fill_store(watch.store, 300_000)
    before = readings_in(watch.store)
    backing, lower, bindfs = drives.passthrough()
    drive = drives.make("ext4", size_mb=128, files={"Password.txt": PASSWORD}, backing=backing)
    watch.start()
    watch.event("add", drive.devname)
    watch.wait_for(rf"^{drive.devname}: writing export")
    bindfs.send_signal(signal.SIGSTOP)
    lines = watch.lines()
    assert not any("renamed into place" in x for x in lines), "the export finished first"
    bindfs.kill()
    bindfs.wait()
    watch.event("remove", drive.devname)
    watch.wait_for(rf"^{drive.devname}: error: ", timeout=180)
    error = next(x for x in watch.lines() if x.startswith(f"{drive.devname}: error: "))
    assert re.search(r"removed|I/O error", error), error
    wait_until(lambda: read_pattern(watch.led) in ("error", "normal_operation"), 30)
    watch.wait_for(rf"^{drive.devname}: drive removed")
    watch.wait_led("normal_operation")
    watch.stop()
    # The gateway store is untouched and whole.
    assert readings_in(watch.store) == before
    out = subprocess.run(
        ["sqlite3", str(watch.store), "PRAGMA integrity_check;"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "ok"
    # Whatever reached the image: nothing under a final name (journal replayed first).
    copy = tmp_path / "after.img"
    shutil.copyfile(lower / drive.image.name, copy)
    subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, check=False)
    listing = subprocess.run(
        ["debugfs", "-R", "ls /", str(copy)], capture_output=True, text=True, check=True
    ).stdout
    assert "Password.txt" in listing
    assert not FINAL_RE.search(" ".join(listing.split())), listing
    assert not re.search(
        r"(data_store|site_config|export)-GW-TEST-\d{8}T\d{6}\+0000\.(db|yaml|sha256)(?!\.partial)",
        listing,
    )


def test_usb_event_records_and_normalises(config_file: ConfigFactory) -> None:
    config = config_file()
    spool = Path(yaml.safe_load(config.read_text())["export"]["spool_dir"])
    assert run_fieldgate("usb-event", "add", "/dev/sdb1", config=config).returncode == 0
    assert run_fieldgate("usb-event", "remove", "sdb1", config=config).returncode == 0
    events = pending_events(spool)
    assert [(e.action, e.devname) for e in events] == [("add", "sdb1"), ("remove", "sdb1")]
    assert not [p for p in spool.iterdir() if p.name.startswith(".")]
    r = run_fieldgate("usb-event", "add", "../../etc/passwd", config=config)
    assert r.returncode == 1
    assert r.stderr.startswith("fieldgate: error: ") and r.stderr.count("\n") == 1
    assert normalize_devname(" /dev/mmcblk0p1 ") == "mmcblk0p1"


def test_stale_mounts_are_cleaned_at_start(watch: Watch) -> None:
    stale = watch.mount_dir / "sdz1-stale"
    stale.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(stale)], check=True)
    try:
        watch.start()
        assert "stale mount" in watch.text()
        assert not stale.exists()
    finally:
        if stale.exists():
            subprocess.run(["umount", "-l", str(stale)], check=False)
    watch.stop()


def test_snapshot_runs_as_the_store_owner(
    config_file: ConfigFactory, drives: Drives, tmp_path: Path
) -> None:
    """usb-watch runs as root; the store's reader and the drive writes run as its owner."""
    home = Path(tempfile.mkdtemp(prefix="fieldgate-owner-", dir="/tmp"))
    try:
        home.chmod(0o755)
        db = home / "data_store.db"
        expected = fill_store(db, 1000)
        for p in (home, *home.iterdir()):
            os.chown(p, 65534, 65534)
        # The snapshot child must reach the store and the mount point: both live under
        # directories it may traverse, as /var/lib/fieldgate and /run/fieldgate do.
        overrides = {"store": {"path": str(db)}, "export": {"mount_dir": str(home / "mnt")}}
        w = Watch(config_file(overrides=overrides))
        drive = drives.make("ext4", files={"Password.txt": PASSWORD})
        w.start()
        try:
            w.event("add", drive.devname)
            assert w.result(drive.devname).startswith(f"{drive.devname}: success"), w.text()
        finally:
            w.stop()
        assert "snapshot runs as uid 65534 gid 65534" in w.text()
        check_export(drives.listing(drive), tmp_path / "copy", expected)
        assert count_rows(db, "state", "key = 'export.state'") == 1
        assert {p.stat().st_uid for p in home.iterdir() if p.name != "mnt"} == {65534}
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_password_file_rules(tmp_path: Path) -> None:
    from fieldgate.usb.blockdev import NotQualified, password_matches, read_password

    assert read_password(tmp_path) is None
    (tmp_path / "PASSWORD.TXT").write_bytes(b"\xef\xbb\xbf open-sesame \r\n")  # Notepad: BOM
    assert read_password(tmp_path) == "open-sesame"  # FAT names are case-insensitive
    (tmp_path / "PASSWORD.TXT").unlink()
    secret = tmp_path / "elsewhere"
    secret.write_text("open-sesame")
    (tmp_path / "Password.txt").symlink_to(secret)
    with pytest.raises(NotQualified, match="symbolic link"):
        read_password(tmp_path)
    (tmp_path / "Password.txt").unlink()
    os.mkfifo(tmp_path / "Password.txt")  # would block a plain open() forever
    with pytest.raises(NotQualified, match="not a regular file"):
        read_password(tmp_path)
    (tmp_path / "Password.txt").unlink()
    (tmp_path / "Password.txt").write_bytes(b"x" * 10_000)
    assert read_password(tmp_path) == ""
    assert password_matches("open-sesame", "open-sesame")
    assert not password_matches("open-sesame ", "open-sesame")
    assert not password_matches("", "open-sesame")


def test_store_owner_cannot_reach_the_drive(
    config_file: ConfigFactory, drives: Drives, tmp_path: Path
) -> None:
    """A mount directory below a directory the store's owner cannot traverse: one clear line."""
    home = Path(tempfile.mkdtemp(prefix="fieldgate-owner-", dir="/tmp"))
    try:
        home.chmod(0o755)
        db = home / "data_store.db"
        fill_store(db, 100)
        for p in (home, *home.iterdir()):
            os.chown(p, 65534, 65534)
        # mount_dir stays under pytest's 0700 tmp directory
        w = Watch(config_file(overrides={"store": {"path": str(db)}}))
        drive = drives.make("ext4", files={"Password.txt": PASSWORD})
        w.start()
        try:
            w.event("add", drive.devname)
            line = w.result(drive.devname)
        finally:
            w.stop()
        assert "a directory above it is not traversable for that user" in line, line
        assert set(drives.listing(drive)) == {"Password.txt"}
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


def store_page(db: Path, number: int) -> bytes:
    """Page ``number`` (1-based) of a store file, as SQLite's backup copies it."""
    with db.open("rb") as f:
        size = int.from_bytes(f.read(18)[16:18], "big")
        f.seek((number - 1) * size)
        return f.read(size)


def export_state(config: Path) -> str | None:
    status = json.loads(run_fieldgate("status", "--json", config=config).stdout)
    return (status["export"]["state"] or {}).get("value")


@pytest.mark.parametrize("fstype", ["ext4", "vfat", "exfat"])
def test_a_byte_flipped_on_the_drive_before_the_read_back_is_an_error(
    watch: Watch, drives: Drives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fstype: str
) -> None:
    """The drive changes a byte of the copy after it was written and synced, under every
    cache: the read-back from the device must see it, and the export fail."""
    fill_store(watch.store, 30_000)
    pages = watch.store.stat().st_size // 4096
    number = pages // 2
    page = store_page(watch.store, number)
    drive = drives.make(fstype, files={"Password.txt": PASSWORD})
    pause = tmp_path / "pause"
    pause.mkdir()
    monkeypatch.setenv("FIELDGATE_TEST_PAUSE_AT", "export-readback")
    monkeypatch.setenv("FIELDGATE_TEST_PAUSE_DIR", str(pause))
    watch.start()
    watch.event("add", drive.devname)
    wait_until((pause / "export-readback.paused").exists, 120, what="copy synced")
    drives.flip_byte(drive, page, at=1000)
    (pause / "export-readback.resume").touch()
    line = watch.result(drive.devname)
    assert line.startswith(
        f"{drive.devname}: error: the copy read back from the drive differs from what was "
        f"written: page {number} "
    ), watch.text()
    if fstype != "ext4":  # under exfat-fuse caught reading its clusters on the device itself
        assert READ_BACK[fstype] in watch.text()
    watch.wait_led("error")
    assert export_state(watch.config) == "error"
    watch.event("remove", drive.devname)
    watch.wait_for(rf"^{drive.devname}: drive removed")
    watch.wait_led("normal_operation")  # logged before the LED is set, after the removal
    assert watch.led_history() == ["normal_operation", "in_progress", "error", "normal_operation"]
    watch.stop()
    assert set(drives.listing(drive)) == {"Password.txt"}  # nothing final, no staging left


def test_a_copy_written_out_of_order_through_fusefat_is_an_error(
    watch: Watch, drives: Drives, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fusefat damages a file extended again after its first cluster was rewritten, as
    SQLite's backup rewrites page 1: the export writes the copy in that order on purpose,
    and the read-back must find the damage."""
    fill_store(watch.store, 60_000)  # several 1 MiB chunks
    assert watch.store.stat().st_size > 3 << 20
    drive = drives.make("vfat", size_mb=96, files={"Password.txt": PASSWORD})
    monkeypatch.setenv("FIELDGATE_TEST_WRITE_ORDER", "sqlite-order")
    watch.start()
    watch.event("add", drive.devname)
    line = watch.result(drive.devname)
    assert "snapshot copied (page 1 rewritten halfway, as SQLite's backup does): " in watch.text()
    assert line.startswith(f"{drive.devname}: error: the copy read back from the drive "), line
    watch.wait_led("error")
    assert export_state(watch.config) == "error"
    watch.stop()
    assert set(drives.listing(drive)) == {"Password.txt"}


@pytest.mark.parametrize("fstype", ["ext4", "vfat", "exfat"])
def test_read_back_comes_from_the_device_not_a_cache(drives: Drives, fstype: str) -> None:
    """What proves the read-back: a byte changed in the image under a mounted filesystem is
    invisible to an ordinary read (a cache answers) and seen by ``read_from_device`` (after
    ``flush_block_device`` where a FUSE driver reads the device)."""
    drive = drives.make(fstype)
    data = b"".join(b"page %06d " % k * 400 + bytes(96) for k in range(256))  # 1 MiB
    fuse = fstype != "ext4"
    device = os.open(drive.loop, os.O_RDONLY)
    try:
        with drives.mount(drive.loop, fstype) as root:
            path = root / "copy.bin"
            with path.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            fsutil.flush_block_device(device)  # the bytes are in the image now
            assert path.read_bytes() == data  # and in every cache again
            at = drives.flip_byte(drive, data[40960 : 40960 + 4000], at=7)
            assert at > 0
            assert path.read_bytes() == data, "no cache between this read and the device"
            if fuse:
                fsutil.flush_block_device(device)
            back = b"".join(bytes(chunk) for chunk in fsutil.read_from_device(path))
    finally:
        os.close(device)
    assert len(back) == len(data)
    assert back[40967] == data[40967] ^ 0xFF
    assert back[:40967] == data[:40967] and back[40968:] == data[40968:]
