"""``status`` reads counters (schema 3: ``device_counts``, ``counts``, ``rejected_reasons``)
kept as rows are written and deleted, not counts of the rows: the figures are the same, and
a store of schema 2 gets them when it is migrated.

Schema-2 stores are made here by schema 2's own SQL (``store.MIGRATIONS[1]`` and ``[2]``)
and the statements its writer and cutter ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from support import ConfigFactory, run_fieldgate

from fieldgate import batches, status, store
from fieldgate.config import load_config

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SCHEMA_2 = store.Schema({1: store.MIGRATIONS[1], 2: store.MIGRATIONS[2]})
FIGURES = ("readings", "rejected", "devices", "batches")


def rows(device: str, n: int, start: int = 0) -> list[tuple[Any, ...]]:
    return [(device, T0 + (start + i) * 1000, "t", 20.0 + i, T0, "mqtt") for i in range(n)]


def status_json(config: Path) -> dict[str, Any]:
    r = run_fieldgate("status", "--json", config=config)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_schema_2_store_is_read_by_counting_and_migrated_with_its_counters(
    config_file: ConfigFactory,
) -> None:
    config = config_file(overrides={"upload": {"batch_max_rows": 1000}})
    cfg = load_config(str(config))
    db = Path(cfg.store.path)
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = store.connect(db)
    store.migrate(conn, str(db), SCHEMA_2)
    store.set_meta(conn, "site_serial", cfg.site.serial)
    with store.transaction(conn):
        conn.executemany(store.INSERT_READING_SQL, rows("TH-001", 30) + rows("TH-002", 12))
        conn.executemany(store.INSERT_READING_SQL, rows("TH-001", 5))  # repeats: ignored
        conn.executemany(store.INSERT_READING_SQL, rows("TH-003", 8, start=100))
        for reason in ["not JSON"] * 3 + ["no metrics"] * 2 + ["ts out of range"]:
            conn.execute(
                "INSERT INTO rejected (received_at, source, topic, payload, reason) "
                "VALUES (?, 'mqtt', 'fieldgate/x/readings', x'7b', ?)",
                (T0, reason),
            )
    # schema 2's cutter: a batch row holding the id range of the oldest 50 readings
    (last_id,) = conn.execute("SELECT id FROM readings ORDER BY id LIMIT 1 OFFSET 49").fetchone()
    with store.transaction(conn):
        conn.execute(
            "INSERT INTO batches (batch_id, state, rows, sha256, first_id, last_id, mode, type, "
            "created_at, uploaded_at) VALUES "
            "('00000001-20260101T000000Z', 'uploaded', 50, '', 1, ?, 'LIVE', 'readings', ?, ?)",
            (last_id, T0, T0),
        )
        conn.executemany(store.INSERT_READING_SQL, rows("TH-002", 4, start=200))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()

    # status does not migrate (it writes nothing): it counts the rows of a schema-2 store
    before = status_json(config)
    assert store.read_store(db, store.schema_version) == 2
    assert before["store"]["schema_version"] == 2
    assert before["readings"] == {"total": 54, "unbatched": 4}
    assert before["rejected"]["total"] == 6
    assert before["rejected"]["top_reasons"] == [
        {"reason": "not JSON", "count": 3},
        {"reason": "no metrics", "count": 2},
        {"reason": "ts out of range", "count": 1},
    ]
    assert [(d["device"], d["readings"], d["last_ts"]) for d in before["devices"]] == [
        ("TH-001", 30, T0 + 29_000),
        ("TH-002", 16, T0 + 203_000),
        ("TH-003", 8, T0 + 107_000),
    ]
    assert (before["batches"]["pending"], before["batches"]["uploaded"]) == (0, 1)

    # the collector (any writer) migrates it: the counters start from the rows
    conn = store.open_store(db, cfg.site.serial)
    assert store.schema_version(conn) == 3
    assert status.store_counts(conn) == status.scan_counts(conn)
    conn.close()
    after = status_json(config)
    assert after["store"]["schema_version"] == 3
    for key in FIGURES:
        assert after[key] == before[key], key


def test_counters_follow_every_write(config_file: ConfigFactory, tmp_path: Path) -> None:
    config = config_file(
        overrides={"upload": {"batch_max_rows": 10, "delete_reading_on_zip": True}}
    )
    cfg = load_config(str(config))
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    with store.transaction(conn):
        assert store.insert_rows(conn, rows("TH-001", 25) + rows("TH-002", 3)) == 28
        # some repeats among new readings: counted from the store, not from the list
        got = store.insert_rows(conn, rows("TH-001", 5, start=22) + rows("TH-004", 2))
        assert got == 2 + 2
        store.insert_rejected(conn, source="mqtt", topic=None, payload=b"", reason="empty")
    counts = status.store_counts(conn)
    assert counts == status.scan_counts(conn)
    assert counts[:3] == (32, 32, 1)
    # cut with delete_reading_on_zip: the readings go, and stop being unbatched
    assert len(batches.cut_all(conn, cfg, limit=2)) == 2
    counts = status.store_counts(conn)
    assert counts == status.scan_counts(conn)
    assert counts[:2] == (12, 12)
    assert [d[:2] for d in counts[4]] == [("TH-001", 7), ("TH-002", 3), ("TH-004", 2)]
    conn.close()
    # and status shows them
    s = status_json(config)
    assert s["readings"] == {"total": 12, "unbatched": 12}
    assert [d["device"] for d in s["devices"]] == ["TH-001", "TH-002", "TH-004"]
    assert s["rejected"] == {"total": 1, "top_reasons": [{"reason": "empty", "count": 1}]}
