"""The disk guard on a real small ext4 filesystem (loop-mounted image; needs root)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    Broker,
    ConfigFactory,
    count_rows,
    publish,
    reading_payload,
    run_fieldgate,
    start_fieldgate,
    stop_process,
    wait_until,
)

from fieldgate.diskguard import DiskGuard, is_disk_full, pause_text
from fieldgate.fsutil import disk_usage_percent

T0 = 1_767_225_600_000

pytestmark = pytest.mark.root


def stream(n: int, start: int = 0) -> list[tuple[str, str]]:
    return [
        ("fieldgate/TH-001/readings", reading_payload(T0 + (start + i) * 1000, t=i, h=50.5))
        for i in range(n)
    ]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB ext4 filesystem (no reserved blocks) mounted under tmp; removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the disk guard tests need root (loop devices and mount)")
    image = tmp_path / "small.img"
    with image.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
            if os.path.ismount(mnt):
                subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def fill_to(mnt: Path, percent: float, name: str = "filler") -> Path:
    """Allocate a file so that the filesystem is at least ``percent`` used."""
    st = os.statvfs(mnt)
    total = st.f_blocks * st.f_frsize
    used = total - st.f_bfree * st.f_frsize
    want = int(total * percent / 100) - used + st.f_frsize
    path = mnt / name
    with path.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(st.f_frsize, want))
    return path


def fill_completely(mnt: Path) -> Path:
    """Take every free block (until ENOSPC)."""
    path = mnt / "everything"
    chunk = b"\0" * (1 << 20)
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
        os.fsync(f.fileno())
    return path


def state_of(db: Path) -> str:
    """``collector.state`` ("" until the collector has created its store and said so)."""
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        row = conn.execute("SELECT value FROM state WHERE key = 'collector.state'").fetchone()
    except sqlite3.OperationalError:  # the schema is being created right now
        return ""
    finally:
        conn.close()
    return row[0] if row else ""


def events_of(db: Path) -> list[str]:
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return [m for (m,) in conn.execute("SELECT message FROM events ORDER BY id")]
    finally:
        conn.close()


def test_guard_hysteresis_on_a_real_filesystem(small_fs: Path) -> None:
    guard = DiskGuard(small_fs, stop_at=80, resume_below=60, interval_secs=0)
    assert guard.check() is None and not guard.paused
    filler = fill_to(small_fs, 85)
    assert guard.check() is True and guard.paused
    assert guard.describe() == pause_text(guard.last_used, 80)
    assert guard.describe().startswith("paused: disk 8") and guard.describe().endswith("≥ 80%")
    filler.unlink()
    small = fill_to(small_fs, 70, name="seventy")
    assert guard.check() is None and guard.paused  # between the thresholds: still paused
    small.unlink()
    assert guard.check() is False and not guard.paused
    assert disk_usage_percent(small_fs) < 60


def test_sqlite_full_is_recognised(small_fs: Path) -> None:
    conn = sqlite3.connect(str(small_fs / "x.db"))
    conn.execute("CREATE TABLE t (b BLOB)")
    fill_completely(small_fs)
    with pytest.raises(sqlite3.Error) as err:
        for _ in range(100):
            conn.execute("INSERT INTO t VALUES (?)", (b"\0" * 65536,))
        conn.commit()
    conn.close()
    assert is_disk_full(err.value)


def start_collector_on(
    small_fs: Path,
    mosquitto: Broker,
    config_file: ConfigFactory,
    log: Path,
    *,
    stop_at: float,
    resume_below: float,
) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """(config, store, process) of ``fieldgate collect`` with its store on ``small_fs``,
    once it runs."""
    config = config_file(
        broker=mosquitto,
        overrides={
            "store": {"path": str(small_fs / "data_store.db")},
            "disk": {
                "stop_accepting_at_percent": stop_at,
                "resume_below_percent": resume_below,
                "check_interval_secs": 0.2,
            },
        },
    )
    db = small_fs / "data_store.db"
    proc = start_fieldgate("collect", config=config, log=log)
    try:
        wait_until(lambda: db.exists() and state_of(db) == "running", what="collector running")
    except BaseException:
        stop_process(proc, signal.SIGTERM)
        raise
    return config, db, proc


def test_intake_pauses_above_threshold_without_loss_and_resumes(
    small_fs: Path, mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    log = tmp_path / "collector.log"
    config, db, proc = start_collector_on(
        small_fs, mosquitto, config_file, log, stop_at=90, resume_below=80
    )
    try:
        publish(mosquitto, stream(100))
        wait_until(lambda: count_rows(db, "readings") == 200)

        filler = fill_to(small_fs, 93)
        wait_until(lambda: state_of(db).startswith("paused: disk"), what="intake paused")
        assert state_of(db).endswith("used ≥ 90%")
        publish(mosquitto, stream(1000, start=100))  # the broker has them all (PUBACKed)
        status = run_fieldgate("status", config=config)
        assert "collector       paused: disk 9" in status.stdout, status.stdout
        assert count_rows(db, "readings") == 200
        assert proc.poll() is None

        filler.unlink()
        wait_until(lambda: count_rows(db, "readings") == 2200, what="the queued backlog")
        assert state_of(db) == "running"
    finally:
        rc = stop_process(proc, signal.SIGTERM)
    assert rc == 0, log.read_text()
    assert count_rows(db, "readings") == 2200
    events = events_of(db)
    assert any(e.startswith("intake paused: disk 9") for e in events), events
    assert any("intake resumed" in e for e in events), events
    text = log.read_text()
    assert "intake paused; messages stay queued on the broker" in text
    assert "intake resumed" in text


def test_sqlite_full_on_commit_acks_nothing_and_retries_after_space_returns(
    small_fs: Path, mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    log = tmp_path / "collector.log"
    # the guard alone would never stop intake before the disk is full
    config, db, proc = start_collector_on(
        small_fs, mosquitto, config_file, log, stop_at=100, resume_below=90
    )
    try:
        publish(mosquitto, stream(10))
        wait_until(lambda: count_rows(db, "readings") == 20)
        everything = fill_completely(small_fs)
        publisher = threading.Thread(target=publish, args=(mosquitto, stream(3000, start=10)))
        publisher.start()
        wait_until(
            lambda: "the store could not commit" in log.read_text(), what="the SQLITE_FULL pause"
        )
        publisher.join()
        assert proc.poll() is None
        everything.unlink()
        wait_until(lambda: count_rows(db, "readings") == 6020, what="every reading after space")
    finally:
        rc = stop_process(proc, signal.SIGTERM)
    assert rc == 0, log.read_text()
    assert count_rows(db, "readings") == 6020
    assert count_rows(db, "rejected") == 0
    assert any("disk full" in e for e in events_of(db))
    assert (
        json.loads(run_fieldgate("status", "--json", config=config).stdout)["readings"]["total"]
        == 6020
    )
