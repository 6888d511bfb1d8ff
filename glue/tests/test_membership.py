"""Batch membership by id range: the invariants, and the migration of stores written by
fieldgate's schema 1 (a ``batch_id`` on every reading), pending batches included.

Schema-1 stores are made here by schema 1's own SQL: its table definitions
(``store.MIGRATIONS[1]``) and the statements its cutter and prune ran, replayed literally.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import astuple
from pathlib import Path

from support import ConfigFactory, Hub, batch_of_each_reading, run_fieldgate

from fieldgate import batches, batchfile, membership, prune, status, store
from fieldgate.config import Config, load_config

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SCHEMA_1 = store.Schema({1: store.MIGRATIONS[1]})
READING = "device, ts, metric, value, received_at, source"


def readings(n: int, start: int = 0) -> list[store.Reading]:
    return [
        ("TH-001", T0 + (start + i) * 1000, "temperature", 20 + (start + i) / 8) for i in range(n)
    ]


def insert(conn: sqlite3.Connection, rows: list[store.Reading]) -> None:
    """Into a store of this schema with its counters; into a replayed older one with the
    statement every schema's writer ran."""
    with store.transaction(conn):
        if store.schema_version(conn) < store.SCHEMA_VERSION:
            conn.executemany(store.INSERT_READING_SQL, [(*r, T0, "mqtt") for r in rows])
        else:
            store.insert_readings(conn, rows, source="mqtt", received_at=T0)


def make_cfg(config_file: ConfigFactory, **upload: object) -> Config:
    return load_config(str(config_file(overrides={"upload": {"mode": "LIVE", **upload}})))


# --- schema 1, replayed -------------------------------------------------------------------


def v1_store(path: Path, serial: str = "GW-TEST") -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = store.connect(path)
    store.migrate(conn, str(path), SCHEMA_1)
    store.set_meta(conn, "site_serial", serial)
    return conn


def v1_cut(
    conn: sqlite3.Connection, seq: int, limit: int, *, delete: bool = False, state: str = "pending"
) -> batches.Batch:
    """Schema 1's cut_batch and _record: read the oldest unbatched readings, then in one
    transaction mark (or delete) them and insert the row."""
    start = conn.execute("SELECT MIN(id) FROM readings WHERE batch_id IS NULL").fetchone()[0]
    rows = conn.execute(
        "SELECT id, device, ts, metric, value FROM readings NOT INDEXED "
        "WHERE id >= ? AND batch_id IS NULL ORDER BY id LIMIT ?",
        (start, limit),
    ).fetchall()
    csv_bytes = batchfile.render_csv([r[1:] for r in rows])
    batch_id = f"{seq:08d}-20260101T000000Z"
    batch = batches.Batch(
        batch_id=batch_id,
        state=state,
        rows=len(rows),
        sha256=batchfile.csv_sha256(csv_bytes),
        first_ts=min(r[2] for r in rows),
        last_ts=max(r[2] for r in rows),
        first_id=start,
        last_id=rows[-1][0],
        mode="LIVE",
        type="readings",
        file=batchfile.file_name("GW-TEST", batch_id),
        created_at=T0,
    )
    with store.transaction(conn):
        if delete:
            conn.execute(
                "DELETE FROM readings WHERE id BETWEEN ? AND ? AND batch_id IS NULL",
                (batch.first_id, batch.last_id),
            )
        else:
            conn.execute(
                "UPDATE readings SET batch_id = ? WHERE id BETWEEN ? AND ? AND batch_id IS NULL",
                (batch_id, batch.first_id, batch.last_id),
            )
        conn.execute(
            f"INSERT INTO batches ({batches.BATCH_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            astuple(batch),
        )
        conn.execute("UPDATE batches SET uploaded_at = ? WHERE state = 'uploaded'", (T0,))
        store.set_meta(conn, "last_batch_seq", str(seq))
    return batch


def v1_prune(conn: sqlite3.Connection, batch_id: str) -> None:
    """Schema 1's prune of one uploaded batch."""
    with store.transaction(conn):
        conn.execute("DELETE FROM readings WHERE batch_id = ?", (batch_id,))


def v1_members(conn: sqlite3.Connection) -> list[tuple[str | None, tuple[object, ...]]]:
    """Schema 1's truth: (batch id or None, reading) of every reading in id order."""
    return [
        (batch_id, tuple(row))
        for batch_id, *row in conn.execute(f"SELECT batch_id, {READING} FROM readings ORDER BY id")  # noqa: S608
    ]


def members(conn: sqlite3.Connection) -> dict[str | None, list[tuple[object, ...]]]:
    """Each batch's readings by id range (None: unbatched), in id order."""
    out: dict[str | None, list[tuple[object, ...]]] = {}
    rows = conn.execute(f"SELECT {READING} FROM readings ORDER BY id").fetchall()  # noqa: S608
    for batch_id, row in zip(batch_of_each_reading(conn), rows, strict=True):
        out.setdefault(batch_id, []).append(tuple(row))
    return out


def assert_migrated(
    db: Path, before: list[tuple[str | None, tuple[object, ...]]]
) -> sqlite3.Connection:
    conn = store.open_store(db, "GW-TEST")
    assert store.schema_version(conn) == store.SCHEMA_VERSION == 3
    # status's counters (schema 3) hold what the rows say
    assert status.store_counts(conn) == status.scan_counts(conn)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(readings)")]
    assert columns == ["id", "device", "ts", "metric", "value", "received_at", "source"]
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'readings'").fetchone()[0]
    assert "AUTOINCREMENT" in sql
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "sqlite_autoindex_readings_1" in indexes  # UNIQUE (device, ts, metric) kept
    assert not {"readings_unbatched", "readings_batch"} & indexes
    # every batch holds exactly the readings schema 1 had marked with its id, in the same
    # order; a reading naming no recorded batch counts as unbatched
    known = {b for (b,) in conn.execute("SELECT batch_id FROM batches")}
    want: dict[str | None, list[tuple[object, ...]]] = {}
    for batch_id, row in before:
        want.setdefault(batch_id if batch_id in known else None, []).append(row)
    assert members(conn) == want
    assert membership.count_unbatched(conn) == len(want.get(None, []))
    # a pending batch's CSV is regenerated byte for byte from its range
    for b in batches.pending_batches(conn):
        rows = membership.readings_of(conn, b.first_id, b.last_id)
        assert batchfile.csv_sha256(batchfile.render_csv(rows)) == b.sha256
    return conn


def ranges(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    return {
        b: (f, la) for b, f, la in conn.execute("SELECT batch_id, first_id, last_id FROM batches")
    }


# --- the invariants -----------------------------------------------------------------------


def test_ids_are_never_reused_after_the_newest_readings_are_deleted(
    config_file: ConfigFactory,
) -> None:
    # delete_reading_on_zip deletes the newest readings: new ones must still be unbatched
    cfg = make_cfg(config_file, batch_max_rows=40, delete_reading_on_zip=True)
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    insert(conn, readings(100))
    first = batches.cut_all(conn, cfg)
    assert [b.rows for b in first] == [40, 40, 20]
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 0
    assert membership.watermark(conn) == 100
    insert(conn, readings(30, start=1000))
    assert membership.count_unbatched(conn) == 30
    (nxt,) = batches.cut_all(conn, cfg)
    assert (nxt.rows, nxt.first_id, nxt.last_id) == (30, 101, 130)
    data, _ = batchfile.read_zip(Path(cfg.upload.pending_dir) / nxt.file)
    assert data == batchfile.render_csv(readings(30, start=1000))
    assert status.store_counts(conn) == status.scan_counts(conn)  # status's counters
    conn.close()


def test_batch_ranges_follow_each_other_and_cover_every_batched_reading(
    config_file: ConfigFactory,
) -> None:
    cfg = make_cfg(config_file, batch_max_rows=25)
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    insert(conn, readings(60))
    cut = batches.cut_all(conn, cfg)
    insert(conn, readings(10, start=500))
    ranges = [(b.first_id, b.last_id) for b in cut]
    assert ranges == [(1, 25), (26, 50), (51, 60)]
    assert (
        batch_of_each_reading(conn)
        == [b.batch_id for b in cut for _ in range(b.rows)] + [None] * 10
    )
    assert membership.watermark(conn) == 60 and membership.count_unbatched(conn) == 10
    assert status.store_counts(conn) == status.scan_counts(conn)  # status's counters
    conn.close()


def test_next_range_counts_readings_not_ids(config_file: ConfigFactory) -> None:
    """The range holds ``limit`` readings whatever ids are missing, and all that are left
    when fewer are; the cut's ts span is its readings' (not their ids' order)."""
    cfg = make_cfg(config_file, batch_max_rows=4)
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    insert(conn, readings(10)[::-1])  # ids 1..10, the latest ts first
    with store.transaction(conn):
        conn.execute("DELETE FROM readings WHERE id IN (2, 3, 7)")
    assert membership.next_range(conn, 0, 4) == (1, 6)
    assert membership.next_range(conn, 6, 4) == (8, 10)
    assert membership.next_range(conn, 10, 4) is None
    cut = batches.cut_batch(conn, cfg)
    assert cut is not None and (cut.first_id, cut.last_id, cut.rows) == (1, 6, 4)
    assert (cut.first_ts, cut.last_ts) == (T0 + 4000, T0 + 9000)
    conn.close()


def test_a_cut_raced_by_another_cut_is_refused_and_cut_again(config_file: ConfigFactory) -> None:
    cfg = make_cfg(config_file, batch_max_rows=50)
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    other = store.open_store(cfg.store.path, cfg.site.serial)
    insert(conn, readings(80))
    above = membership.watermark(conn)
    span = membership.next_range(conn, above, 50)
    assert span == (1, 50)
    # another uploader's cut commits first
    theirs = batches.cut_batch(other, cfg)
    assert theirs is not None and (theirs.first_id, theirs.last_id) == (1, 50)
    late = batches.Batch(
        batch_id="00000099-20260101T000000Z",
        state="pending",
        rows=50,
        sha256="0" * 64,
        first_ts=T0,
        last_ts=T0 + 49_000,
        first_id=span[0],
        last_id=span[1],
        mode="LIVE",
        type="readings",
        file="x.zip",
        created_at=T0,
    )
    try:
        batches._record(conn, cfg, late, above)
    except Exception as exc:
        assert "another batch took the readings up to id 50" in str(exc)
    else:
        raise AssertionError("a raced cut was recorded")
    assert batches.get_batch(conn, late.batch_id) is None
    # and a cut from here takes what is left, once
    mine = batches.cut_batch(conn, cfg)
    assert mine is not None and (mine.first_id, mine.last_id, mine.rows) == (51, 80, 30)
    assert batch_of_each_reading(conn) == [theirs.batch_id] * 50 + [mine.batch_id] * 30
    assert status.store_counts(conn) == status.scan_counts(conn)  # status's counters
    other.close()
    conn.close()


def test_prune_of_the_newest_batches_lowers_the_watermark_and_loses_nothing(
    config_file: ConfigFactory,
) -> None:
    cfg = make_cfg(config_file, batch_max_rows=40)
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    insert(conn, readings(100))
    cut = batches.cut_all(conn, cfg)
    with store.transaction(conn):
        conn.execute("UPDATE batches SET state = 'uploaded', uploaded_at = ?", (T0,))
    insert(conn, readings(10, start=1000))  # arrive while prune runs: unbatched
    r = prune.prune(conn, cfg, now_ms=T0 + (cfg.store.retention_days + 1) * prune.DAY_MS)
    assert (r.readings, r.batches) == (100, len(cut))
    # every batch row went with its readings: the watermark falls to 0, and exactly the
    # readings that arrived since are unbatched
    assert membership.watermark(conn) == 0
    assert membership.count_unbatched(conn) == 10
    insert(conn, readings(5, start=2000))
    (nxt,) = batches.cut_all(conn, cfg)
    assert (nxt.rows, nxt.first_id, nxt.last_id) == (15, 101, 115)
    data, _ = batchfile.read_zip(Path(cfg.upload.pending_dir) / nxt.file)
    assert data == batchfile.render_csv(readings(10, start=1000) + readings(5, start=2000))
    assert status.store_counts(conn) == status.scan_counts(conn)  # status's counters
    conn.close()


def test_merge_while_batches_are_pending_adds_only_unbatched_readings(
    config_file: ConfigFactory, tmp_path: Path
) -> None:
    cfg = make_cfg(config_file, batch_max_rows=1000)
    config = Path(cfg.path)
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    insert(conn, readings(50))
    (pending,) = batches.cut_all(conn, cfg)
    # an export of another store holding some of the same readings and newer ones
    export = tmp_path / "export.db"
    src = store.open_store(export, "GW-TEST")
    insert(src, readings(40, start=30))
    src.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    src.close()
    r = run_fieldgate("restore", str(export), "--merge", config=config)
    assert r.returncode == 0, r.stderr
    assert "20 new" in r.stdout
    assert membership.count_unbatched(conn) == 20
    rows = membership.readings_of(conn, pending.first_id, pending.last_id)
    assert batchfile.csv_sha256(batchfile.render_csv(rows)) == pending.sha256
    assert status.store_counts(conn) == status.scan_counts(conn)  # status's counters
    conn.close()


# --- migration from schema 1 --------------------------------------------------------------


def test_migration_of_a_long_lived_store_with_pending_batches(config_file: ConfigFactory) -> None:
    cfg = make_cfg(config_file, batch_max_rows=1000)
    db = Path(cfg.store.path)
    conn = v1_store(db)
    insert(conn, readings(100))
    a = v1_cut(conn, 1, 40, state="uploaded")
    b = v1_cut(conn, 2, 30, state="uploaded")
    v1_prune(conn, b.batch_id)
    c = v1_cut(conn, 3, 20)
    before = v1_members(conn)
    assert Counter(b for b, _ in before) == {a.batch_id: 40, c.batch_id: 20, None: 10}
    conn.close()

    conn = assert_migrated(db, before)
    assert ranges(conn) == {a.batch_id: (1, 40), b.batch_id: (41, 40), c.batch_id: (41, 60)}
    assert membership.watermark(conn) == 60
    # the next cut takes exactly the unbatched readings, after every id ever used
    (d,) = batches.cut_all(conn, cfg)
    assert (d.rows, d.first_id, d.last_id) == (10, 61, 70)
    insert(conn, readings(1, start=5000))
    assert conn.execute("SELECT MAX(id) FROM readings").fetchone()[0] == 71
    conn.close()


def test_migration_of_a_store_whose_ids_were_reused(config_file: ConfigFactory) -> None:
    cfg = make_cfg(config_file)
    db = Path(cfg.store.path)
    conn = v1_store(db)
    insert(conn, readings(50))
    d = v1_cut(conn, 1, 50, delete=True, state="uploaded")
    insert(conn, readings(30, start=100))
    # schema 1 handed out ids 1..30 again: batch d's range covers readings it never held
    assert conn.execute("SELECT MIN(id), MAX(id) FROM readings").fetchone() == (1, 30)
    e = v1_cut(conn, 2, 20)
    # and a reading naming a batch that was never recorded
    insert(conn, readings(3, start=200))
    with store.transaction(conn):
        conn.execute("UPDATE readings SET batch_id = 'ghost' WHERE id > 30")
    before = v1_members(conn)
    conn.close()

    conn = assert_migrated(db, before)
    assert ranges(conn) == {d.batch_id: (1, 0), e.batch_id: (1, 20)}
    assert membership.count_unbatched(conn) == 13
    assert status.store_counts(conn) == status.scan_counts(conn)  # status's counters
    conn.close()


def test_migrated_pending_batch_is_uploaded_with_its_schema_1_file(
    config_file: ConfigFactory, hub: Hub
) -> None:
    config = config_file(
        overrides={"upload": {"mode": "LIVE", "batch_max_rows": 1000, "url": hub.url}}
    )
    cfg = load_config(str(config))
    db = Path(cfg.store.path)
    conn = v1_store(db)
    insert(conn, readings(90))
    v1_cut(conn, 1, 40, state="uploaded")
    c = v1_cut(conn, 2, 30)
    pending_dir, _ = batches.ensure_dirs(cfg)
    batches.write_zip(
        pending_dir / c.file,
        batchfile.render_csv(
            conn.execute(
                "SELECT device, ts, metric, value FROM readings WHERE batch_id = ? ORDER BY id",
                (c.batch_id,),
            ).fetchall()
        ),
        c.manifest("GW-TEST"),
    )
    conn.close()
    hub.register(config)
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert "regenerated" not in r.stderr and "orphan" not in r.stderr
    # the pending batch (30) and the unbatched readings (20) went up; the uploaded 40 did not
    assert hub.readings("GW-TEST") == 50
    arrived = [b for (b,) in hub.query("SELECT batch_id FROM batches ORDER BY seq")]
    assert len(arrived) == 2 and arrived[0] == c.batch_id
    conn = store.open_store(db, "GW-TEST")
    assert membership.count_unbatched(conn) == 0
    assert batches.pending_batches(conn) == []
    conn.close()


def test_a_schema_1_export_restores_and_imports(config_file: ConfigFactory, tmp_path: Path) -> None:
    export = tmp_path / "drive" / "data_store-GW-OLD.db"
    conn = v1_store(export, "GW-OLD")
    insert(conn, readings(30))
    v1_cut(conn, 1, 20)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    config = config_file(serial="GW-OLD")
    r = run_fieldgate("restore", str(export), "--as-site", "GW-OLD", config=config)
    assert r.returncode == 0, r.stderr
    cfg = load_config(str(config))
    conn = store.open_store(cfg.store.path, "GW-OLD")
    assert membership.count_unbatched(conn) == 30
    conn.close()
    r = run_fieldgate("hub", "import", str(export), "--db", str(tmp_path / "hub.db"), "--create")
    assert r.returncode == 0, r.stderr
    hub_conn = sqlite3.connect(str(tmp_path / "hub.db"))
    assert (
        hub_conn.execute("SELECT COUNT(*) FROM readings WHERE serial = 'GW-OLD'").fetchone()[0]
        == 30
    )
    hub_conn.close()
    # the export itself is untouched: still schema 1
    c2 = sqlite3.connect(str(export))
    assert c2.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    c2.close()
