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
from typing import Any, cast

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


def collector_config(
    small_fs: Path,
    mosquitto: Broker,
    config_file: ConfigFactory,
    stop_at: float,
    resume_below: float,
) -> Path:
    return config_file(
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
    config = collector_config(small_fs, mosquitto, config_file, stop_at, resume_below)
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
        # status tells the truth the store could not take, and writes nothing to tell it
        before = files_beside(db)
        s = status_json(config)
        assert files_beside(db) == before
        assert s["collector"]["running"] is True
        assert s["collector"]["pid"] == proc.pid
        assert s["collector"]["state"]["value"] == "paused: disk full (the store could not commit)"
        assert s["collector"]["recorded_state"]["value"] == "running"  # the write was refused
        assert s["disk"]["free_bytes"] < 1 << 20, s["disk"]
        text = run_fieldgate("status", config=config).stdout
        assert "collector       paused: disk full (the store could not commit) (since " in text
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


def files_beside(db: Path) -> dict[str, int]:
    """Every file in the store's directory with its size."""
    return {p.name: p.stat().st_size for p in db.parent.iterdir()}


def status_json(config: Path) -> dict[str, Any]:
    result = run_fieldgate("status", "--json", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return cast(dict[str, Any], json.loads(result.stdout))


def collector_state(config: Path) -> str:
    """What status says the collector does ("" before it has said anything)."""
    state = status_json(config)["collector"]["state"]
    return str(state["value"]) if state else ""


def status_once_waiting(config: Path) -> dict[str, Any]:
    """``status --json`` once the collector says it waits for disk space."""
    wait_until(
        lambda: collector_state(config).startswith("waiting for disk space: "),
        what="the collector waiting",
    )
    return status_json(config)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def collect_then_fill(
    small_fs: Path,
    mosquitto: Broker,
    config_file: ConfigFactory,
    log: Path,
    *,
    messages: int,
    stop_at: float,
) -> tuple[Path, Path, Path]:
    """(config, store, filler): ``messages`` collected (two readings each), the collector
    stopped, then the filesystem filled to the last block."""
    config, db, proc = start_collector_on(
        small_fs, mosquitto, config_file, log, stop_at=stop_at, resume_below=90
    )
    publish(mosquitto, stream(messages))
    wait_until(lambda: count_rows(db, "readings") == 2 * messages)
    assert stop_process(proc, signal.SIGTERM) == 0, log.read_text()
    return config, db, fill_completely(small_fs)


def test_status_on_a_full_disk_without_daemons_reads_and_writes_nothing(
    small_fs: Path, mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """After a clean stop (the store alone, no -wal) and after a kill (-wal and -shm left
    with commits in them), each on a filesystem without one free block."""
    log = tmp_path / "collector.log"
    config, db, everything = collect_then_fill(
        small_fs, mosquitto, config_file, log, messages=50, stop_at=99
    )
    before = files_beside(db)
    assert "data_store.db-wal" not in before
    s = status_json(config)
    text = run_fieldgate("status", config=config)
    assert files_beside(db) == before  # no -wal, no -shm, nothing
    assert text.returncode == 0, text.stderr
    assert s["readings"]["total"] == 100 and s["readings"]["unbatched"] == 100
    assert s["collector"]["running"] is False
    assert s["collector"]["state"]["value"] == "stopped"
    assert s["disk"]["used_percent"] >= 99.9 and s["disk"]["over_threshold"] is True
    assert "collector       stopped (since " in text.stdout
    assert ": over the threshold, " in text.stdout
    everything.unlink()

    proc = start_fieldgate("collect", config=config, log=log)
    wait_until(lambda: collector_state(config) == "running")
    publish(mosquitto, stream(70, start=50))
    wait_until(lambda: status_json(config)["readings"]["total"] == 240)
    writer = children(proc.pid)
    assert len(writer) == 1
    for pid in (proc.pid, *writer):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not Path(f"/proc/{writer[0]}").exists(), what="the writer gone")
    everything = fill_completely(small_fs)
    before = files_beside(db)
    assert before["data_store.db-wal"] > 0 and "data_store.db-shm" in before
    s = status_json(config)
    assert files_beside(db) == before
    assert s["readings"]["total"] == 240
    assert s["collector"]["running"] is False
    assert s["collector"]["state"]["value"] == "running"  # the store's word, stale
    text = run_fieldgate("status", config=config).stdout
    assert "collector       not running (last recorded: running (since " in text
    everything.unlink()


def test_collector_started_on_a_full_disk_waits_then_stores_the_backlog(
    small_fs: Path, mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    log = tmp_path / "collector.log"
    config, db, everything = collect_then_fill(
        small_fs, mosquitto, config_file, log, messages=10, stop_at=100
    )
    publish(mosquitto, stream(500, start=10))  # queued by the broker for the collector's session
    proc = start_fieldgate("collect", config=config, log=log)
    try:
        s = status_once_waiting(config)
        assert s["collector"]["running"] is True and s["collector"]["pid"] == proc.pid
        assert s["readings"]["total"] == 20
        text = run_fieldgate("status", config=config).stdout
        assert "collector       waiting for disk space: " in text
        assert "% used, the store cannot be opened (store " in text
        assert proc.poll() is None
        everything.unlink()
        wait_until(lambda: count_rows(db, "readings") == 1020, what="the backlog after space")
        wait_until(lambda: collector_state(config) == "running")
    finally:
        rc = stop_process(proc, signal.SIGTERM)
    assert rc == 0, log.read_text()
    assert count_rows(db, "readings") == 1020
    assert count_rows(db, "rejected") == 0
    text = log.read_text()
    assert text.count("waiting for disk space") == 1, text  # said once, not every retry
    assert "disk space returned" in text


def test_collector_started_on_a_full_disk_without_a_store_waits_and_creates_it(
    small_fs: Path, mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    log = tmp_path / "collector.log"
    config = collector_config(small_fs, mosquitto, config_file, 100, 90)
    db = small_fs / "data_store.db"
    everything = fill_completely(small_fs)
    proc = start_fieldgate("collect", config=config, log=log)
    try:
        s = status_once_waiting(config)
        assert s["store"]["exists"] is False and s["collector"]["running"] is True
        assert not db.exists() or db.stat().st_size == 0  # SQLite may leave an empty file
        text = run_fieldgate("status", config=config).stdout
        assert "(not created yet" in text and "collector       waiting for disk space" in text
        everything.unlink()
        wait_until(lambda: db.exists() and state_of(db) == "running", what="collector running")
        publish(mosquitto, stream(100))
        wait_until(lambda: count_rows(db, "readings") == 200)
    finally:
        rc = stop_process(proc, signal.SIGTERM)
    assert rc == 0, log.read_text()
    assert count_rows(db, "readings") == 200
