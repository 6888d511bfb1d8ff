"""Restore: an exported database is validated, then loaded exactly once."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from support import count_rows, record_batch, run_fieldgate

from fieldgate import store
from fieldgate.membership import UNBATCHED

T0 = 1_760_000_000_000


def make_export(
    directory: Path, serial: str, n: int, *, start: int = 0, checksum: bool = True
) -> Path:
    """An exported store as the USB exporter writes it: a consistent copy + sha256 file."""
    directory.mkdir(parents=True, exist_ok=True)
    live = directory / f".live-{serial}-{start}.db"
    conn = store.open_store(live, serial)
    with store.transaction(conn):
        store.insert_readings(
            conn,
            [
                ("TH-001", T0 + i * 1000, "temperature", 20.0 + i % 7)
                for i in range(start, start + n)
            ],
            source="mqtt",
        )
    name = f"data_store-{serial}-20261121T101500+0000.db"
    out = directory / name
    conn.execute("VACUUM INTO ?", (str(out),))
    conn.close()
    for p in directory.glob(f".live-{serial}-{start}.db*"):
        p.unlink()
    if checksum:
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        (directory / f"export-{serial}-20261121T101500+0000.sha256").write_text(
            f"{digest}  {name}\n"
        )
    return out


def fingerprint(db: Path) -> tuple[int, int, str | None]:
    if not db.exists():
        return (0, 0, None)
    conn = sqlite3.connect(str(db))
    try:
        n = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        unb = conn.execute(f"SELECT COUNT(*) FROM readings WHERE {UNBATCHED}").fetchone()[0]  # noqa: S608
        site = conn.execute("SELECT value FROM meta WHERE key='site_serial'").fetchone()
        return (n, unb, site[0] if site else None)
    finally:
        conn.close()


@pytest.fixture
def gateway(config_file, tmp_path):  # type: ignore[no-untyped-def]
    cfg = config_file(serial="GW-NEW")
    return cfg, Path(str(tmp_path / "gw" / "var" / "data_store.db"))


def test_restore_as_site_loads_readings_unbatched(gateway, tmp_path: Path) -> None:
    cfg, db = gateway
    export = make_export(tmp_path / "drive", "GW-OLD", 500)
    r = run_fieldgate("restore", str(export), "--as-site", "GW-NEW", config=cfg)
    assert r.returncode == 0, r
    assert "500 new, 0 already present" in r.stdout
    assert "checksum verified" in r.stdout
    assert fingerprint(db) == (500, 500, "GW-NEW")
    assert count_rows(db, "readings", "source LIKE 'restore:%'") == 500


def test_merge_twice_stores_each_reading_once(gateway, tmp_path: Path) -> None:
    cfg, db = gateway
    first = make_export(tmp_path / "a", "GW-NEW", 300)
    overlapping = make_export(tmp_path / "b", "GW-NEW", 300, start=200)
    r = run_fieldgate("restore", str(first), "--merge", config=cfg)
    assert r.returncode == 0, r
    assert "300 new" in r.stdout
    r = run_fieldgate("restore", str(first), "--merge", config=cfg)
    assert r.returncode == 0, r
    assert "0 new, 300 already present" in r.stdout
    r = run_fieldgate("restore", str(overlapping), "--merge", config=cfg)
    assert "200 new, 100 already present" in r.stdout
    assert fingerprint(db)[0] == 500


def _corrupt_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    for off in range(page, len(data) - page, page):  # every page but the header page
        data[off + 16 : off + 200] = b"\xff" * 184
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "does not exist"),
        ("not_sqlite", "is not an SQLite database"),
        ("truncated", "damaged"),
        ("corrupted", "damaged"),
        ("newer_schema", "newer than this fieldgate supports"),
        ("checksum", "checksum mismatch"),
        ("not_fieldgate", "not a fieldgate store"),
    ],
)
def test_bad_input_is_refused_and_nothing_changes(
    gateway, tmp_path: Path, damage: str, message: str
) -> None:
    cfg, db = gateway
    # the gateway already holds uploaded-state readings of its own
    run_fieldgate(
        "restore", str(make_export(tmp_path / "own", "GW-NEW", 50)), "--merge", config=cfg
    )
    conn = sqlite3.connect(str(db))
    assert record_batch(conn, "b1") == 50
    conn.close()
    before = fingerprint(db)
    export = make_export(tmp_path / "drive", "GW-OLD", 2000, checksum=(damage == "checksum"))
    if damage == "missing":
        export = tmp_path / "nowhere.db"
    elif damage == "not_sqlite":
        export.write_text("device,ts,metric,value\nTH-001,1,t,1\n" * 100)
    elif damage == "truncated":
        with export.open("r+b") as f:
            f.truncate(export.stat().st_size // 2)
    elif damage == "corrupted":
        _corrupt_middle(export)
    elif damage == "newer_schema":
        c = sqlite3.connect(str(export))
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        c.commit()
        c.close()
    elif damage == "checksum":
        with export.open("r+b") as f:
            f.seek(export.stat().st_size - 10)
            f.write(b"0123456789")
    elif damage == "not_fieldgate":
        export.unlink()
        c = sqlite3.connect(str(export))
        c.execute("CREATE TABLE t (x)")
        c.commit()
        c.close()
    for how in (["--as-site", "GW-NEW", "--force"], ["--merge"]):
        r = run_fieldgate("restore", str(export), *how, config=cfg)
        assert r.returncode == 1, r
        assert r.stderr.startswith("fieldgate: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert fingerprint(db) == before


def test_unuploaded_data_needs_force(gateway, tmp_path: Path) -> None:
    cfg, db = gateway
    own = make_export(tmp_path / "own", "GW-NEW", 10, start=5000)
    run_fieldgate("restore", str(own), "--merge", config=cfg)
    before = fingerprint(db)
    export = make_export(tmp_path / "drive", "GW-OLD", 100)
    r = run_fieldgate("restore", str(export), "--as-site", "GW-NEW", config=cfg)
    assert r.returncode == 1
    assert "holds 10 readings not yet uploaded" in r.stderr and "--force" in r.stderr
    assert fingerprint(db) == before
    r = run_fieldgate("restore", str(export), "--as-site", "GW-NEW", "--force", config=cfg)
    assert r.returncode == 0, r
    assert fingerprint(db)[0] == 110


def test_restore_as_site_refuses_to_mix_sites(config_file, tmp_path: Path) -> None:
    cfg_old = config_file(serial="GW-A", name="a.yaml")
    db = tmp_path / "gw" / "var" / "data_store.db"
    conn = store.open_store(db, "GW-A")
    with store.transaction(conn):
        store.insert_readings(conn, [("TH-001", T0, "t", 1.0)], source="mqtt")
    record_batch(conn, "x")
    conn.close()
    export = make_export(tmp_path / "drive", "GW-OLD", 10)
    cfg_new = config_file(serial="GW-B", name="b.yaml")
    r = run_fieldgate("restore", str(export), "--as-site", "GW-B", config=cfg_new)
    assert r.returncode == 1
    assert "holds 1 readings of site GW-A" in r.stderr and "set that store aside" in r.stderr
    # and the configuration must name the new site first
    r = run_fieldgate("restore", str(export), "--as-site", "GW-B", config=cfg_old)
    assert r.returncode == 1
    assert "site.serial is GW-A; set it to GW-B first" in r.stderr
    assert fingerprint(db) == (1, 0, "GW-A")


def test_dry_run_validates_and_changes_nothing(gateway, tmp_path: Path) -> None:
    cfg, db = gateway
    export = make_export(tmp_path / "drive", "GW-OLD", 40)
    r = run_fieldgate("restore", str(export), "--as-site", "GW-OTHER", "--dry-run", config=cfg)
    assert r.returncode == 0, r
    assert "valid fieldgate store of site GW-OLD" in r.stdout and "40 readings" in r.stdout
    assert "checksum verified" in r.stdout and "nothing changed" in r.stdout
    assert not db.exists()
    bad = tmp_path / "bad.db"
    bad.write_text("nope")
    r = run_fieldgate("restore", str(bad), "--merge", "--dry-run", config=cfg)
    assert r.returncode == 1 and "is not an SQLite database" in r.stderr
