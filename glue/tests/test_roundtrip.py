"""Export on one gateway -> restore on another -> upload -> the hub holds it exactly once."""

from __future__ import annotations

from pathlib import Path

from support import Hub, count_rows, run_fieldgate

from fieldgate import store
from fieldgate.membership import UNBATCHED

T0 = 1_760_000_000_000
N = 1200


def gateway(config_file, tmp_path: Path, serial: str, hub: Hub) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    var = tmp_path / serial
    var.mkdir()
    cfg = config_file(
        serial=serial,
        name=f"{serial}.yaml",
        overrides={
            "store": {"path": str(var / "data_store.db")},
            "upload": {
                "url": hub.url,
                "key_file": str(var / "gateway_key"),
                "pending_dir": str(var / "pending"),
                "uploaded_dir": str(var / "uploaded"),
                "batch_max_rows": 500,
            },
        },
    )
    return cfg, var / "data_store.db"


def test_export_restore_upload_exactly_once(config_file, tmp_path: Path, hub: Hub) -> None:
    cfg_a, db_a = gateway(config_file, tmp_path, "GW-A", hub)
    cfg_b, db_b = gateway(config_file, tmp_path, "GW-B", hub)
    conn = store.open_store(db_a, "GW-A")
    readings = {("TH-001", T0 + i * 1000, m, float(i)) for i in range(N // 2) for m in "th"}
    with store.transaction(conn):
        store.insert_readings(conn, sorted(readings), source="mqtt")
    conn.close()

    drive = tmp_path / "drive"
    drive.mkdir()
    r = run_fieldgate("export", "--to", str(drive), config=cfg_a)
    assert r.returncode == 0, r
    (export,) = drive.glob("data_store-GW-A-*.db")

    r = run_fieldgate("restore", str(export), "--as-site", "GW-B", config=cfg_b)
    assert r.returncode == 0, r
    assert f"{N} new" in r.stdout and "checksum verified" in r.stdout
    assert count_rows(db_b, "readings", UNBATCHED) == N

    hub.register(cfg_b)
    r = run_fieldgate("upload", "--once", config=cfg_b)
    assert r.returncode == 0, r
    assert hub.readings("GW-B") == N
    assert hub.readings("GW-A") == 0
    at_hub = set(hub.query("SELECT device, ts, metric, value FROM readings WHERE serial='GW-B'"))
    assert at_hub == readings

    # merging the same export again, twice, adds nothing and uploads nothing new
    for _ in range(2):
        r = run_fieldgate("restore", str(export), "--merge", config=cfg_b)
        assert r.returncode == 0, r
        assert f"0 new, {N} already present" in r.stdout
    r = run_fieldgate("upload", "--once", config=cfg_b)
    assert r.returncode == 0, r
    assert count_rows(db_b, "readings") == N
    assert hub.readings("GW-B") == N


def test_hub_import_is_exactly_once(config_file, tmp_path: Path, hub: Hub) -> None:
    cfg_a, db_a = gateway(config_file, tmp_path, "GW-A", hub)
    conn = store.open_store(db_a, "GW-A")
    with store.transaction(conn):
        store.insert_readings(conn, [("TH-002", T0 + i, "p", 1.0) for i in range(N)], source="mqtt")
    conn.close()
    drive = tmp_path / "drive"
    drive.mkdir()
    assert run_fieldgate("export", "--to", str(drive), config=cfg_a).returncode == 0
    (export,) = drive.glob("data_store-GW-A-*.db")
    hub.stop()  # the office imports straight into the hub's database
    for expected_new in (N, 0):
        r = run_fieldgate("hub", "import", "--db", str(hub.db), str(export))
        assert r.returncode == 0, r
        assert f"{N} readings, {expected_new} new" in r.stdout
    hub.start()
    assert hub.readings("GW-A") == N


def test_hub_import_refuses_a_damaged_file(tmp_path: Path, hub: Hub) -> None:
    bad = tmp_path / "data_store-GW-X-20261121T000000+0000.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    r = run_fieldgate("hub", "import", "--db", str(hub.db), str(bad))
    assert r.returncode == 1
    assert r.stderr.startswith("fieldgate: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "damaged" in r.stderr or "not a fieldgate store" in r.stderr
