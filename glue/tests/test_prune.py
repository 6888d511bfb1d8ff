"""``fieldgate prune``: only readings the hub has had for longer than the retention go."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

from support import ConfigFactory, Hub, batch_of_each_reading, run_fieldgate

from fieldgate import batches, membership, prune, status, store
from fieldgate.config import Config, load_config

T0 = 1_767_225_600_000
DAY = 86_400_000


def fill(cfg: Config, n: int, start: int = 0) -> None:
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    with store.transaction(conn):
        store.insert_readings(
            conn,
            [("TH-001", T0 + (start + i) * 1000, "t", float(i)) for i in range(n)],
            source="test",
        )
    conn.close()


def test_prune_deletes_only_uploaded_readings_older_than_retention(
    hub: Hub, config_file: ConfigFactory
) -> None:
    config = config_file(
        overrides={
            "store": {"retention_days": 30},
            "upload": {"url": hub.url, "batch_max_rows": 1000},
        }
    )
    cfg = load_config(str(config))
    hub.register(config)
    fill(cfg, 3000)
    assert run_fieldgate("upload", "--once", config=config).returncode == 0
    fill(cfg, 500, start=10_000)  # cut into a batch but never uploaded
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    (pending,) = batches.cut_all(conn, cfg)
    fill(cfg, 200, start=20_000)  # not even batched
    uploaded = sorted(Path(cfg.upload.uploaded_dir).glob("GW-TEST-*.zip"))
    assert len(uploaded) == 3

    # nothing is old enough yet
    r = prune.prune(conn, cfg)
    assert r.readings == 0
    # 31 days later: the uploaded readings go, the pending and unbatched ones stay
    r = prune.prune(conn, cfg, now_ms=store.now_ms() + 31 * DAY)
    assert (r.readings, r.batches, r.files) == (3000, 3, 3)
    assert r.free_bytes > 0
    left = Counter(batch_of_each_reading(conn))
    assert left == {pending.batch_id: 500, None: 200}
    assert membership.count_unbatched(conn) == 200
    assert not any(p.exists() for p in uploaded)
    assert (Path(cfg.upload.pending_dir) / pending.file).exists()
    # the rows of the pruned batches go too; the pending one stays
    assert dict(conn.execute("SELECT state, COUNT(*) FROM batches GROUP BY state")) == {
        "pending": 1
    }
    # running again frees nothing more
    assert prune.prune(conn, cfg, now_ms=store.now_ms() + 31 * DAY).readings == 0
    # the batch sequence lives on: no batch id is ever used twice
    (later,) = batches.cut_all(conn, cfg)
    assert later.batch_id.startswith("00000005-")
    assert status.store_counts(conn) == status.scan_counts(conn)  # status's counters
    conn.close()
    assert hub.readings("GW-TEST") == 3000  # the hub keeps everything


def test_pass_mode_batches_are_never_pruned(config_file: ConfigFactory) -> None:
    config = config_file(overrides={"store": {"retention_days": 1}, "upload": {"mode": "PASS"}})
    cfg = load_config(str(config))
    fill(cfg, 100)
    assert run_fieldgate("upload", "--once", config=config).returncode == 0
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    assert prune.prune(conn, cfg, now_ms=store.now_ms() + 400 * DAY).readings == 0
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 100
    conn.close()


def test_a_batch_passed_after_a_switch_to_pass_mode_is_never_pruned(
    config_file: ConfigFactory,
) -> None:
    # cut for the hub (LIVE), then the gateway is switched to PASS before it was sent
    live = config_file(overrides={"store": {"retention_days": 1}})
    cfg = load_config(str(live))
    fill(cfg, 100)
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    (batch,) = batches.cut_all(conn, cfg)
    conn.close()
    passed = config_file(
        name="pass.yaml", overrides={"store": {"retention_days": 1}, "upload": {"mode": "PASS"}}
    )
    assert run_fieldgate("upload", "--once", config=passed).returncode == 0
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    state = conn.execute("SELECT state, mode FROM batches WHERE batch_id = ?", (batch.batch_id,))
    assert state.fetchone() == ("uploaded", "PASS")
    assert prune.prune(conn, cfg, now_ms=store.now_ms() + 400 * DAY).readings == 0
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 100
    assert (Path(cfg.upload.uploaded_dir) / batch.file).exists()
    conn.close()


def test_test_mode_batches_are_pruned_once_the_hub_has_them(
    hub: Hub, config_file: ConfigFactory
) -> None:
    config = config_file(
        overrides={"store": {"retention_days": 1}, "upload": {"url": hub.url, "mode": "TEST"}}
    )
    cfg = load_config(str(config))
    hub.register(config)
    fill(cfg, 100)
    assert run_fieldgate("upload", "--once", config=config).returncode == 0
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    assert prune.prune(conn, cfg, now_ms=store.now_ms() + 2 * DAY).readings == 100
    conn.close()
    assert hub.query("SELECT COUNT(*), SUM(test) FROM readings") == [(100, 100)]


def test_with_delete_reading_on_zip_the_files_go_only_once_the_hub_has_them(
    hub: Hub, config_file: ConfigFactory
) -> None:
    """The batch file is the only copy: kept while pending, deleted after the retention
    once the hub stored it, never in PASS mode."""
    config = config_file(
        overrides={
            "store": {"retention_days": 1},
            "upload": {"url": hub.url, "batch_max_rows": 50, "delete_reading_on_zip": True},
        }
    )
    cfg = load_config(str(config))
    hub.register(config)
    fill(cfg, 100)
    assert run_fieldgate("upload", "--once", config=config).returncode == 0
    fill(cfg, 30, start=1000)
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    (pending,) = batches.cut_all(conn, cfg)
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 0
    uploaded = sorted(Path(cfg.upload.uploaded_dir).glob("*.zip"))
    assert len(uploaded) == 2
    r = prune.prune(conn, cfg, now_ms=store.now_ms() + 2 * DAY)
    assert (r.readings, r.batches, r.files) == (0, 2, 2)
    assert list(Path(cfg.upload.uploaded_dir).glob("*.zip")) == []
    assert (Path(cfg.upload.pending_dir) / pending.file).exists()
    conn.close()
    assert hub.readings("GW-TEST") == 100

    passing = config_file(
        name="pass.yaml",
        overrides={
            "store": {"retention_days": 1},
            "upload": {"mode": "PASS", "delete_reading_on_zip": True},
        },
    )
    assert run_fieldgate("upload", "--once", config=passing).returncode == 0
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    r = prune.prune(conn, cfg, now_ms=store.now_ms() + 400 * DAY)
    assert (r.readings, r.batches, r.files) == (0, 0, 0)
    assert [p.name for p in Path(cfg.upload.uploaded_dir).glob("*.zip")] == [pending.file]
    conn.close()


def test_old_rejected_messages_and_events_go_newer_ones_stay(config_file: ConfigFactory) -> None:
    config = config_file(overrides={"store": {"retention_days": 10}})
    cfg = load_config(str(config))
    conn = store.open_store(cfg.store.path, cfg.site.serial)
    now = store.now_ms()
    with store.transaction(conn):
        for age_days in (30, 11, 9, 0):
            store.insert_rejected(
                conn,
                source="mqtt",
                topic="fieldgate/x/readings",
                payload=b"{",
                reason=f"bad JSON ({age_days} days old)",
                received_at=now - age_days * DAY,
            )
            conn.execute(
                "INSERT INTO events (at, kind, message) VALUES (?, 'test', ?)",
                (now - age_days * DAY, f"{age_days} days old"),
            )
        for age_days in (30, 0):  # one reason, one message pruned and one kept
            store.insert_rejected(
                conn,
                source="mqtt",
                topic=None,
                payload=b"",
                reason="empty payload",
                received_at=now - age_days * DAY,
            )
    r = prune.prune(conn, cfg, now_ms=now)
    assert (r.rejected, r.events) == (3, 2)
    assert [row[0] for row in conn.execute("SELECT reason FROM rejected ORDER BY id")] == [
        "bad JSON (9 days old)",
        "bad JSON (0 days old)",
        "empty payload",
    ]
    # status's counters follow: 3 left, each reason once
    assert status.store_counts(conn) == status.scan_counts(conn)
    assert status.store_counts(conn)[2:4] == (
        3,
        [
            {"reason": r, "count": 1}
            for r in sorted(["bad JSON (9 days old)", "bad JSON (0 days old)", "empty payload"])
        ],
    )
    kinds = [row[0] for row in conn.execute("SELECT message FROM events ORDER BY id")]
    assert kinds[:2] == ["9 days old", "0 days old"]
    assert kinds[2].startswith("pruned 0 readings of 0 batches")
    conn.close()


def test_prune_command_reports_in_one_line(config_file: ConfigFactory) -> None:
    config = config_file(overrides={"store": {"retention_days": 90}})
    cfg = load_config(str(config))
    fill(cfg, 10)
    r = run_fieldgate("prune", config=config)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("pruned 0 readings uploaded before ")
    assert "(retention 90 days)" in r.stdout
    assert "free in the store file" in r.stdout
    conn = sqlite3.connect(cfg.store.path)
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 10
    conn.close()
