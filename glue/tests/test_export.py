"""``fieldgate export --to DIR``: the same export as on a USB drive, into a directory."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from support import (
    FIELDGATE,
    SENSOR_PASSWORD,
    SENSOR_USER,
    Broker,
    ConfigFactory,
    reading_payload,
    run_fieldgate,
    start_fieldgate,
    stop_process,
    wait_until,
)

from fieldgate import store
from fieldgate.config import load_config
from fieldgate.export import ExportNames, export_to, format_ts, reserve_names


def store_of(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["store"]["path"])


def fill(db: Path, rows: int, *, device: str = "TH-001", t0: int = 1_700_000_000_000) -> None:
    conn = store.open_store(db, "GW-TEST")
    with store.transaction(conn):
        store.insert_readings(
            conn,
            ((device, t0 + i * 1000, "temperature", float(i % 40)) for i in range(rows)),
            source="mqtt",
        )
    conn.close()


def keys(db: Path) -> set[tuple[str, int, str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return set(conn.execute("SELECT device, ts, metric FROM readings"))
    finally:
        conn.close()


def sha256sum_check(directory: Path, ts: str) -> None:
    p = subprocess.run(
        ["sha256sum", "-c", f"export-GW-TEST-{ts}.sha256"],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(": OK") == 2


def test_export_writes_three_verified_files(config_file: ConfigFactory, tmp_path: Path) -> None:
    config = config_file()
    db = store_of(config)
    fill(db, 20_000)
    target = tmp_path / "out"
    target.mkdir()
    (target / "unrelated.txt").write_text("keep me")
    r = run_fieldgate("export", "--to", str(target), config=config)
    assert r.returncode == 0, r.stderr
    printed = [Path(x) for x in r.stdout.split()]
    assert [p.name.split("-GW-TEST-")[0] for p in printed] == [
        "data_store",
        "site_config",
        "export",
    ]
    ts = printed[0].name.removeprefix("data_store-GW-TEST-").removesuffix(".db")
    time.strptime(ts, "%Y%m%dT%H%M%S+0000")
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [p.name for p in printed] + ["unrelated.txt"]
    )
    sha256sum_check(target, ts)
    copy = target / f"data_store-GW-TEST-{ts}.db"
    # A self-contained file in rollback-journal mode: readable from read-only media.
    assert copy.read_bytes()[18:20] == b"\x01\x01"
    out = subprocess.run(
        [
            "sqlite3",
            f"file:{copy}?mode=ro",
            "PRAGMA integrity_check; SELECT COUNT(*) FROM readings;",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["ok", "20000"]
    assert keys(copy) == keys(db)
    conf = yaml.safe_load((target / f"site_config-GW-TEST-{ts}.yaml").read_text())
    assert conf["site"]["serial"] == "GW-TEST"
    assert "password_file" not in conf["mqtt"] and "password_file" not in conf["export"]
    text = (target / f"site_config-GW-TEST-{ts}.yaml").read_text()
    for secret in ("open-sesame", "collector-secret", "not-registered-yet", "secrets/"):
        assert secret not in text
    # The gateway store was only read (the result line goes into its state table).
    conn = sqlite3.connect(str(db))
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 20_000
    conn.close()
    status = json.loads(run_fieldgate("status", "--json", config=config).stdout)
    assert status["export"]["last_result"]["value"].startswith("success: export to ")


def test_two_exports_in_the_same_second_get_distinct_names(
    config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = config_file()
    fill(store_of(config), 5000)
    target = tmp_path / "out"
    target.mkdir()
    env = {"FIELDGATE_CONFIG": str(config)}
    procs = [
        subprocess.Popen(
            [FIELDGATE, "export", "--to", str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    stamps = {
        Path(out.split()[0]).name.removeprefix("data_store-GW-TEST-").removesuffix(".db")
        for out, _ in results
    }
    assert len(stamps) == 3
    assert len(list(target.iterdir())) == 9
    for ts in stamps:
        sha256sum_check(target, ts)


def test_reserve_names_skips_taken_seconds_and_touches_nothing(tmp_path: Path) -> None:
    clock = [1_800_000_000.2]
    slept: list[float] = []

    def sleep(secs: float) -> None:
        slept.append(secs)
        clock[0] += secs

    taken = ExportNames("GW-TEST", format_ts(clock[0]))
    (tmp_path / taken.db).write_text("old database")
    (tmp_path / taken.checksum).write_text("old checksum")
    names = reserve_names(tmp_path, "GW-TEST", now=lambda: clock[0], sleep=sleep)
    assert names.ts == format_ts(1_800_000_001)
    assert names.ts == "20270115T080001+0000"
    assert len(slept) == 1
    assert (tmp_path / taken.db).read_text() == "old database"
    assert (tmp_path / names.staging).is_dir()
    # The staging directory is the reservation: a second claim in that second moves on.
    again = reserve_names(tmp_path, "GW-TEST", now=lambda: clock[0], sleep=sleep)
    assert again.ts == format_ts(1_800_000_002)


def test_target_must_be_a_directory(config_file: ConfigFactory, tmp_path: Path) -> None:
    config = config_file()
    fill(store_of(config), 10)
    r = run_fieldgate("export", "--to", str(tmp_path / "missing"), config=config)
    assert r.returncode == 1
    missing = tmp_path / "missing"
    assert r.stderr == (
        f"fieldgate: error: export target {missing} is not a directory (create it first)\n"
    )


def test_no_store_yet(config_file: ConfigFactory, tmp_path: Path) -> None:
    config = config_file()
    r = run_fieldgate("export", "--to", str(tmp_path), config=config)
    assert r.returncode == 1
    assert "does not exist: nothing to export yet" in r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.root
@pytest.mark.parametrize(
    ("options", "cause"),
    [("ro,size=64m", "is on a read-only filesystem"), ("size=1m", "not enough free space")],
)
def test_unwritable_or_full_target(
    config_file: ConfigFactory, tmp_path: Path, options: str, cause: str
) -> None:
    config = config_file()
    fill(store_of(config), 30_000)
    target = tmp_path / "small"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
    try:
        r = run_fieldgate("export", "--to", str(target), config=config)
        assert r.returncode == 1
        assert r.stderr.startswith("fieldgate: error: ") and cause in r.stderr
        assert r.stderr.count("\n") == 1
        assert list(target.iterdir()) == []
    finally:
        subprocess.run(["umount", str(target)], check=True)
    status = json.loads(run_fieldgate("status", "--json", config=config).stdout)
    assert status["export"]["last_result"]["value"].startswith("error: export to ")


#: A stand-in for the collector's write pattern: another process committing about 1,000
#: readings a second in small transactions (50 rows every 50 ms) and, on SIGTERM, reporting
#: how many it committed and its longest commit (wait for the write lock included).
WRITER = """
import json, signal, sys, time
from fieldgate import store
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
conn = store.open_store(sys.argv[1], "GW-TEST")
t0, i, longest = 1_767_225_600_000, 0, 0.0
print("ready", flush=True)
while not stop:
    started = time.monotonic()
    with store.transaction(conn):
        store.insert_readings(
            conn, [("TH-001", t0 + (i + k) * 1000, "temperature", 21.5) for k in range(50)],
            source="mqtt",
        )
    longest = max(longest, time.monotonic() - started)
    i += 50
    time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))
print(json.dumps({"committed": i, "longest_commit_s": round(longest, 4)}), flush=True)
"""


def test_readings_written_during_the_export_are_all_stored(
    config_file: ConfigFactory, tmp_path: Path
) -> None:
    """Ingest continues at about 1,000 readings/s in another process while the export runs.

    (The real collector is exercised against the same store in test_collector.py; here a
    writer process with the collector's commit pattern keeps the count of what it committed,
    which makes "none lost" exact.)
    """
    config = config_file()
    db = store_of(config)
    fill(db, 600_000, device="TH-002")  # about 45 MB: the snapshot takes a while
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        wait_until(lambda: stored_count(db, "TH-001") >= 1000, 60, what="ingest under way")
        committed_before = keys(db)
        began = store.now_ms()
        target = tmp_path / "out"
        target.mkdir()
        r = run_fieldgate("export", "--to", str(target), config=config)
        ended = store.now_ms()
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)  # a few more commits after the export
    finally:
        writer.send_signal(signal.SIGTERM)
        out, _ = writer.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    print(f"writer: {report}")
    final = keys(db)
    t0 = 1_767_225_600_000
    written = {("TH-001", t0 + i * 1000, "temperature") for i in range(report["committed"])}
    assert {k for k in final if k[0] == "TH-001"} == written  # none lost, none invented
    copy = next(target.glob("data_store-*.db"))
    snap = keys(copy)
    assert committed_before <= snap <= final
    # Ingest went on while the snapshot was taken: rows committed in between are in the
    # store, and not in the snapshot.
    conn = sqlite3.connect(str(db))
    during = conn.execute(
        "SELECT COUNT(*) FROM readings WHERE device = 'TH-001' AND received_at BETWEEN ? AND ?",
        (began, ended),
    ).fetchone()[0]
    conn.close()
    assert during > 0
    assert snap != final


def stored_count(db: Path, device: str) -> int:
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return int(
            conn.execute("SELECT COUNT(*) FROM readings WHERE device = ?", (device,)).fetchone()[0]
        )
    finally:
        conn.close()


@pytest.mark.parametrize("verify", [None, "readback", "quick_check", "integrity_check"])
def test_every_export_is_read_back_and_verify_may_add_a_sqlite_check(
    config_file: ConfigFactory, tmp_path: Path, verify: str | None
) -> None:
    overrides = {"export": {"verify": verify}} if verify else None
    config = config_file(overrides=overrides)
    fill(store_of(config), 1000)
    r = run_fieldgate("export", "--to", str(tmp_path), config=config)
    assert r.returncode == 0, r.stderr
    assert "read back from the drive and compared with what was written" in r.stderr
    assert "checksum file written, synced and read back" in r.stderr
    for pragma in ("quick_check", "integrity_check"):
        assert (f"{pragma} ok" in r.stderr) == (pragma == verify)


def test_an_unknown_verify_setting_is_refused_in_one_line(config_file: ConfigFactory) -> None:
    config = config_file(overrides={"export": {"verify": "sha256"}})
    r = run_fieldgate("export", "--to", "/tmp", config=config)
    assert r.returncode != 0
    assert r.stderr.startswith("fieldgate: ") and "export.verify" in r.stderr
    assert r.stderr.count("\n") == 1


def test_a_damaged_copy_is_refused(tmp_path: Path) -> None:
    from fieldgate.errors import FieldgateError
    from fieldgate.export import integrity_check, snapshot

    src = tmp_path / "src.db"
    fill(src, 20_000)
    copy = tmp_path / "copy.db"
    snapshot(src, copy)
    integrity_check(copy)
    with copy.open("r+b") as f:  # garble a b-tree page in the middle of the file
        f.seek(4096 * 20 + 100)
        f.write(b"\xff" * 400)
    for pragma in ("integrity_check", "quick_check"):
        with pytest.raises(FieldgateError, match=f"the snapshot failed {pragma}"):
            integrity_check(copy, pragma)


def collector_state(db: Path) -> str | None:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return None
    try:
        row = conn.execute("SELECT value FROM state WHERE key = 'collector.state'").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return row[0] if row else None


def test_readings_published_during_the_export_reach_the_store(
    mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """The real collector, fed by a real broker at about 1,000 msg/s, while the export runs."""
    config = config_file(broker=mosquitto)
    db = store_of(config)
    fill(db, 600_000, device="TH-002")  # about 45 MB: the snapshot takes a while
    collector = start_fieldgate("collect", config=config, log=tmp_path / "collect.log")
    sent: list[int] = []
    stop = threading.Event()
    t0 = 1_767_225_600_000

    def publisher() -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.username_pw_set(SENSOR_USER, SENSOR_PASSWORD)
        client.max_inflight_messages_set(200)
        client.max_queued_messages_set(0)
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        infos = []
        i = 0
        try:
            while not stop.is_set():
                started = time.monotonic()
                for _ in range(50):
                    payload = reading_payload(t0 + i * 1000, temperature=21.5)
                    infos.append(client.publish("fieldgate/TH-001/readings", payload, qos=1))
                    sent.append(i)
                    i += 1
                time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))
            for info in infos:
                info.wait_for_publish(timeout=60)
                assert info.is_published()
        finally:
            client.disconnect()
            client.loop_stop()

    thread = threading.Thread(target=publisher)
    try:
        wait_until(lambda: collector_state(db) == "running", 30, what="collector running")
        thread.start()
        wait_until(lambda: stored_count(db, "TH-001") >= 2000, 60, what="ingest under way")
        committed_before = keys(db)
        began = store.now_ms()
        target = tmp_path / "out"
        target.mkdir()
        r = run_fieldgate("export", "--to", str(target), config=config)
        ended = store.now_ms()
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(120)
    try:
        wait_until(lambda: stored_count(db, "TH-001") >= len(sent), 60, what="all stored")
    finally:
        assert stop_process(collector) == 0
    final = keys(db)
    published = {("TH-001", t0 + i * 1000, "temperature") for i in sent}
    assert {k for k in final if k[0] == "TH-001"} == published  # none lost
    snap = keys(next(target.glob("data_store-*.db")))
    assert committed_before <= snap <= final
    conn = sqlite3.connect(str(db))
    during = conn.execute(
        "SELECT COUNT(*) FROM readings WHERE device = 'TH-001' AND received_at BETWEEN ? AND ?",
        (began, ended),
    ).fetchone()[0]
    conn.close()
    assert during > 0  # the collector kept committing while the snapshot was taken
    assert snap != final


def test_backup_raises_what_broke_the_observer(tmp_path: Path) -> None:
    """A failure inside the write observer comes out of the backup as itself, not as
    SQLite's "disk I/O error"."""
    from fieldgate.export import backup
    from fieldgate.teevfs import TeeVfs

    src = tmp_path / "src.db"
    fill(src, 20_000)

    def observe(offset: int, data: memoryview) -> None:
        if offset > 100_000:
            raise ValueError("the observer broke")

    with TeeVfs(observe) as vfs, pytest.raises(ValueError, match="the observer broke"):
        backup(src, tmp_path / "copy.db", vfs=vfs)


def test_the_store_file_is_copied_and_a_reader_holding_the_log_falls_back_to_the_backup(
    config_file: ConfigFactory, tmp_path: Path
) -> None:
    """The snapshot is the store's file itself, held still by a read transaction begun when
    the log was wholly checkpointed; when another reader holds part of the log back (so the
    file alone is not a snapshot), SQLite's backup takes it instead. Both restore whole."""
    config = config_file()
    db = store_of(config)
    fill(db, 20_000)
    cfg = load_config(config)
    lines: list[str] = []
    first = export_to(cfg, mkdir(tmp_path / "a"), note=lines.append)
    assert any(line.startswith("snapshot copied: ") for line in lines), lines
    assert keys(first.files[0]) == keys(db)
    sha256sum_check(first.directory, first.names.ts)

    old = store.connect(db, readonly=True)
    writer = store.connect(db)
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        old.execute("BEGIN")
        old.execute("SELECT count(*) FROM readings").fetchone()  # a reader at this point
        fill(db, 100, device="TH-LATE")  # frames after it, which it keeps from the file
        lines.clear()
        second = export_to(cfg, mkdir(tmp_path / "b"), note=lines.append)
    finally:
        old.close()
        writer.close()
    assert any("cannot be copied as a file (another reader holds" in line for line in lines)
    assert any(line.startswith("snapshot written: ") for line in lines), lines
    assert keys(second.files[0]) == keys(db)
    sha256sum_check(second.directory, second.names.ts)


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path
