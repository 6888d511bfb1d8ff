"""Cutting batches: content, one batch per reading, crash safety at every step (real store,
real files, real SIGKILL of a real ``fieldgate upload`` process)."""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import signal
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from support import ConfigFactory, batch_of_each_reading, run_fieldgate

from fieldgate import batches, batchfile, membership, store
from fieldgate.config import Config, load_config

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def readings(n: int, start: int = 0, device: str = "TH-001") -> list[store.Reading]:
    return [
        (device, T0 + (start + i) * 1000, "temperature", 20 + (start + i) * 0.1) for i in range(n)
    ]


def fill(cfg: Config, rows: list[store.Reading]) -> None:
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    with store.transaction(conn):
        store.insert_readings(conn, rows, source="test")
    conn.close()


def open_conn(cfg: Config) -> sqlite3.Connection:
    return store.open_store(cfg.store.path, cfg.site.serial)


def make_cfg(config_file: ConfigFactory, **upload: object) -> Config:
    return load_config(str(config_file(overrides={"upload": {"mode": "PASS", **upload}})))


def csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


def test_batches_hold_oldest_readings_with_manifest(config_file: ConfigFactory) -> None:
    cfg = make_cfg(config_file, batch_max_rows=50, type="climate")
    fill(cfg, readings(120))
    conn = open_conn(cfg)
    cut = batches.cut_all(conn, cfg)
    assert [b.rows for b in cut] == [50, 50, 20]
    assert [b.batch_id for b in cut] == sorted(b.batch_id for b in cut)
    pending = Path(cfg.upload.pending_dir)
    assert sorted(p.name for p in pending.glob("GW-TEST-*.zip")) == sorted(
        f"GW-TEST-{b.batch_id}.zip" for b in cut
    )
    data, manifest = batchfile.read_zip(pending / cut[0].file)
    rows = csv_rows(data)
    assert rows[0] == ["device", "ts", "metric", "value"]
    assert rows[1:] == [[d, str(ts), m, repr(v)] for d, ts, m, v in readings(50)]
    assert manifest["batch_id"] == cut[0].batch_id
    assert manifest["serial"] == "GW-TEST"
    assert manifest["rows"] == 50
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() == cut[0].sha256
    assert (manifest["first_ts"], manifest["last_ts"]) == (T0, T0 + 49_000)
    assert (manifest["mode"], manifest["type"]) == ("PASS", "climate")
    # every reading belongs to exactly one batch, the one whose file holds it
    assert batch_of_each_reading(conn) == [b.batch_id for b in cut for _ in range(b.rows)]
    assert batches.cut_batch(conn, cfg) is None
    # newer readings go into the next batch only
    fill(cfg, readings(5, start=500))
    nxt = batches.cut_all(conn, cfg)
    assert [b.rows for b in nxt] == [5]
    assert nxt[0].batch_id > cut[-1].batch_id
    conn.close()


def test_values_survive_the_csv_exactly(config_file: ConfigFactory) -> None:
    cfg = make_cfg(config_file)
    odd = [
        ("TH-001", T0, "a", 0.1 + 0.2),
        ("TH-001", T0, "b", -1e-300),
        ("dev,comma", T0, "c", 3.0),
    ]
    fill(cfg, odd)
    conn = open_conn(cfg)
    (b,) = batches.cut_all(conn, cfg)
    data, _ = batchfile.read_zip(Path(cfg.upload.pending_dir) / b.file)
    back = [(d, int(ts), m, float(v)) for d, ts, m, v in csv_rows(data)[1:]]
    assert back == odd
    conn.close()


def test_delete_reading_on_zip_removes_readings_after_the_file_exists(
    config_file: ConfigFactory,
) -> None:
    cfg = make_cfg(config_file, batch_max_rows=40, delete_reading_on_zip=True)
    fill(cfg, readings(100))
    conn = open_conn(cfg)
    cut = batches.cut_all(conn, cfg)
    assert [b.rows for b in cut] == [40, 40, 20]
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 0
    total = 0
    for b in cut:
        data, manifest = batchfile.read_zip(Path(cfg.upload.pending_dir) / b.file)
        assert manifest["rows"] == len(csv_rows(data)) - 1 == b.rows
        total += b.rows
    assert total == 100
    conn.close()


def test_missing_file_is_regenerated_identically(config_file: ConfigFactory) -> None:
    cfg = make_cfg(config_file, batch_max_rows=30)
    fill(cfg, readings(30))
    conn = open_conn(cfg)
    (b,) = batches.cut_all(conn, cfg)
    path = Path(cfg.upload.pending_dir) / b.file
    before = batchfile.read_zip(path)
    path.unlink()
    batches.recover(conn, cfg)
    assert batchfile.read_zip(path) == before
    conn.close()


def test_missing_file_without_readings_is_marked_lost(config_file: ConfigFactory) -> None:
    cfg = make_cfg(config_file, delete_reading_on_zip=True)
    fill(cfg, readings(10))
    conn = open_conn(cfg)
    (b,) = batches.cut_all(conn, cfg)
    (Path(cfg.upload.pending_dir) / b.file).unlink()
    batches.recover(conn, cfg)
    state, err = conn.execute(
        "SELECT state, last_error FROM batches WHERE batch_id = ?", (b.batch_id,)
    ).fetchone()
    assert state == "lost"
    assert "deleted on zip" in err
    assert batches.pending_batches(conn) == []
    conn.close()


def _crash(config: Path, point: str) -> None:
    r = run_fieldgate("upload", "--once", config=config, env={batches.CRASH_ENV: point})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


def test_killed_while_writing_a_batch_file_leaves_no_half_batch(
    config_file: ConfigFactory,
) -> None:
    config = config_file(overrides={"upload": {"mode": "PASS", "batch_max_rows": 1000}})
    cfg = load_config(str(config))
    fill(cfg, readings(2500))
    _crash(config, "writing_batch")
    pending = Path(cfg.upload.pending_dir)
    # the kill hit in the middle of the zip: only a hidden temporary file, no batch
    assert [p.name for p in pending.glob("GW-TEST-*.zip")] == []
    assert [p.name for p in pending.glob(".tmp-*")] != []
    conn = open_conn(cfg)
    assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0
    assert membership.count_unbatched(conn) == 2500
    conn.close()
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert "interrupted batch write" in r.stderr
    assert list(pending.glob(".tmp-*")) == []
    _assert_all_batched_once(cfg, 2500)


def test_killed_between_file_and_commit_leaves_an_orphan_that_is_removed(
    config_file: ConfigFactory,
) -> None:
    config = config_file(
        overrides={
            "upload": {"mode": "PASS", "batch_max_rows": 1000, "delete_reading_on_zip": True}
        }
    )
    cfg = load_config(str(config))
    fill(cfg, readings(1500))
    _crash(config, "batch_file_written")
    pending = Path(cfg.upload.pending_dir)
    orphans = list(pending.glob("GW-TEST-*.zip"))
    assert len(orphans) == 1  # a complete file the store never recorded
    conn = open_conn(cfg)
    assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 1500  # none deleted
    conn.close()
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert "orphan batch file" in r.stderr
    assert not orphans[0].exists()
    uploaded = sorted(Path(cfg.upload.uploaded_dir).glob("*.zip"))
    rows = [row for p in uploaded for row in csv_rows(batchfile.read_zip(p)[0])[1:]]
    assert rows == [[d, str(ts), m, repr(v)] for d, ts, m, v in readings(1500)]


def _assert_all_batched_once(cfg: Config, n: int) -> None:
    conn = open_conn(cfg)
    assert membership.count_unbatched(conn) == 0
    per_batch = dict(conn.execute("SELECT batch_id, rows FROM batches"))
    counted = Counter(batch_of_each_reading(conn))
    assert per_batch == counted
    assert sum(per_batch.values()) == n
    files = sorted(Path(cfg.upload.uploaded_dir).glob("*.zip"))
    assert len(files) == len(per_batch)
    seen = [row for p in files for row in csv_rows(batchfile.read_zip(p)[0])[1:]]
    assert len(seen) == n == len({tuple(r[:3]) for r in seen})
    conn.close()


def test_render_csv_is_what_csv_writer_writes() -> None:
    plain = [("TH-001", T0 + i, "temperature", i / 7) for i in range(100)]
    odd = [*plain, ('say "hi"', T0, "t", 1.0), ("a\nb", T0, "t", -0.0)]
    for rows in (plain, odd):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["device", "ts", "metric", "value"])
        w.writerows(rows)
        assert batchfile.render_csv(rows) == buf.getvalue().encode()
        assert batchfile.render_csv(iter(rows)) == buf.getvalue().encode()


def test_garbage_collection_is_paused_only_while_a_batch_is_read() -> None:
    assert gc.isenabled()
    with batches.gc_paused():
        assert not gc.isenabled()
        with batches.gc_paused():  # another thread's pause inside: stays off
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(OSError), batches.gc_paused():
        raise OSError("disk gone")
    assert gc.isenabled()  # on again after an error
    gc.disable()  # off by the program's choice: left off
    try:
        with batches.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
