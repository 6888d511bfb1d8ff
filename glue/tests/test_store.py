"""The store: schema, uniqueness, migrations, site ownership."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from fieldgate import store
from fieldgate.errors import FieldgateError


def test_created_on_first_use_with_contract_tables(tmp_path: Path) -> None:
    db = tmp_path / "data_store.db"
    conn = store.open_store(db, "GW-1")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"readings", "rejected", "batches", "meta"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.get_meta(conn, "site_serial") == "GW-1"
    assert store.get_meta(conn, "schema_version") == str(store.SCHEMA_VERSION)
    conn.close()
    # a plain SQLite file the sqlite3 shell reads
    out = subprocess.run(
        ["sqlite3", str(db), "SELECT value FROM meta WHERE key='site_serial'"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "GW-1"


def test_same_reading_twice_is_one_row(tmp_path: Path) -> None:
    conn = store.open_store(tmp_path / "s.db", "GW-1")
    rows = [("TH-1", 1_700_000_000_000, "t", 1.5), ("TH-1", 1_700_000_000_000, "h", 40.0)]
    with store.transaction(conn):
        assert store.insert_readings(conn, rows, source="test") == 2
    with store.transaction(conn):
        assert (
            store.insert_readings(
                conn, [*rows, ("TH-1", 1_700_000_000_001, "t", 2.0)], source="test"
            )
            == 1
        )
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 3


def test_one_devices_readings_are_the_rows_the_general_insert_writes(tmp_path: Path) -> None:
    general = store.open_store(tmp_path / "a.db", "GW-1")
    device = store.open_store(tmp_path / "b.db", "GW-1")
    ts, source = 1_700_000_000_000, "modbus:MTR-1"
    # more than one statement's worth, values that must come back exactly
    readings = [(f"m{i}", i / 3 + 0.1, ts + 7 + i // 100) for i in range(store.ROWS_PER_INSERT + 5)]
    with store.transaction(general):
        store.insert_reading_rows(
            general, [v for m, value, at in readings for v in ("MTR-1", ts, m, value, at, source)]
        )
    with store.transaction(device):
        assert store.insert_device_readings(device, "MTR-1", ts, source, readings) == len(readings)
    with store.transaction(device):  # stored already: ignored, and not counted again
        again = [*readings[:2], ("new", 1.0, ts + 9)]
        assert store.insert_device_readings(device, "MTR-1", ts, source, again) == 1
    with store.transaction(general):
        store.insert_reading_rows(general, ["MTR-1", ts, "new", 1.0, ts + 9, source])
    # the same rows in the same order (an ignored row may use up an id here: ids are never
    # reused, gaps are allowed)
    query = "SELECT device, ts, metric, value, received_at, source FROM readings ORDER BY id"
    assert device.execute(query).fetchall() == general.execute(query).fetchall()
    counters = "SELECT * FROM device_counts UNION ALL SELECT * FROM counts ORDER BY 1"
    assert device.execute(counters).fetchall() == general.execute(counters).fetchall()
    assert device.execute("SELECT readings FROM device_counts").fetchone() == (len(readings) + 1,)


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    conn = store.open_store(tmp_path / "s.db", "GW-1")
    with pytest.raises(RuntimeError), store.transaction(conn):
        store.insert_readings(conn, [("TH-1", 1, "t", 1.0)], source="test")
        raise RuntimeError("boom")
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 0


def test_store_of_another_site_is_refused(tmp_path: Path) -> None:
    store.open_store(tmp_path / "s.db", "GW-1").close()
    with pytest.raises(FieldgateError, match=r"belongs to site GW-1.*site.serial is GW-2"):
        store.open_store(tmp_path / "s.db", "GW-2")


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = store.open_store(tmp_path / "s.db", "GW-1")
    store.set_meta(conn, "schema_version", str(store.SCHEMA_VERSION + 1))
    conn.close()
    with pytest.raises(FieldgateError, match="newer than this fieldgate supports"):
        store.open_store(tmp_path / "s.db", "GW-1")


def test_not_a_database_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "s.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FieldgateError, match=r"store .*s.db: file is not a database"):
        store.open_store(bad, "GW-1")


def test_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FieldgateError, match=r"store directory .*nope does not exist"):
        store.open_store(tmp_path / "nope" / "s.db", "GW-1")


def test_state_and_events(tmp_path: Path) -> None:
    conn = store.open_store(tmp_path / "s.db", "GW-1")
    store.set_state(conn, "collector.state", "running")
    store.set_state(conn, "collector.state", "paused: disk full")
    store.add_event(conn, "power", "onbattery")
    assert store.get_state(conn)["collector.state"][0] == "paused: disk full"
    assert conn.execute("SELECT kind, message FROM events").fetchall() == [("power", "onbattery")]


def test_readings_readable_by_other_connections_while_written(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = store.open_store(db, "GW-1")
    writer.execute("BEGIN IMMEDIATE")
    store.insert_readings(writer, [("A", 1, "m", 1.0)], source="t")
    reader = sqlite3.connect(str(db))
    assert reader.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 0
    writer.execute("COMMIT")
    assert reader.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 1
