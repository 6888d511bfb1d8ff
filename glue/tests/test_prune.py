"""``fieldgate prune``: only readings the hub has had for longer than the retention go."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from support import ConfigFactory, Hub, run_fieldgate

from fieldgate import batches, prune, store
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
    left = dict(conn.execute("SELECT COALESCE(batch_id, '-'), COUNT(*) FROM readings GROUP BY 1"))
    assert left == {pending.batch_id: 500, "-": 200}
    assert not any(p.exists() for p in uploaded)
    assert (Path(cfg.upload.pending_dir) / pending.file).exists()
    assert conn.execute("SELECT COUNT(*) FROM batches WHERE state = 'uploaded'").fetchone()[0] == 3
    # running again frees nothing more
    assert prune.prune(conn, cfg, now_ms=store.now_ms() + 31 * DAY).readings == 0
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
