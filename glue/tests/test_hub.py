"""The reference hub over real HTTP (gunicorn on loopback), on both backends (SQLite and a
real PostgreSQL): registration, the two-step upload, every refusal with its status code,
exactly-once storage, summaries, and ``hub import``."""

from __future__ import annotations

import hashlib
import json
import socket
import stat
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from support import Hub, make_user, query_db, run_fieldgate, wait_until

from fieldgate import batchfile, store
from fieldgate.hub.backends import open_storage
from fieldgate.hub.storage import IngestError

SERIAL = "GW-HUB"
T0 = 1_767_225_600_000


def make_batch(
    batch_id: str, n: int, *, serial: str = SERIAL, start: int = 0, mode: str = "LIVE"
) -> tuple[dict[str, Any], bytes, bytes]:
    """(manifest, zip bytes, csv bytes) of a batch as a gateway cuts it."""
    rows = [("TH-001", T0 + (start + i) * 1000, "temperature", 20 + i * 0.5) for i in range(n)]
    data = batchfile.render_csv(rows)
    manifest = {
        "batch_id": batch_id,
        "serial": serial,
        "rows": n,
        "sha256": hashlib.sha256(data).hexdigest(),
        "first_ts": rows[0][1],
        "last_ts": rows[-1][1],
        "mode": mode,
        "type": "readings",
    }
    return manifest, zip_of(data, manifest), data


def zip_of(data: bytes, manifest: dict[str, Any], *, skip: str = "") -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if skip != "readings.csv":
            zf.writestr("readings.csv", data)
        if skip != "manifest.yaml":
            zf.writestr("manifest.yaml", yaml.safe_dump(manifest))
    return buf.getvalue()


def register(hub: Hub, serial: str = SERIAL) -> str:
    r = requests.post(
        f"{hub.url}/api/v1/register", json={"pin": hub.pin(serial), "serial": serial}, timeout=30
    )
    assert r.status_code == 201, r.text
    return str(r.json()["gateway_key"])


def offer(hub: Hub, key: str, manifest: dict[str, Any]) -> requests.Response:
    return requests.post(
        f"{hub.url}/api/v1/batches",
        json=manifest,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def put(url: str, body: bytes) -> requests.Response:
    return requests.put(url, data=body, timeout=60)


def held(hub: Hub, serial: str = SERIAL) -> int:
    return hub.readings(serial)


def test_health_and_summary(hub: Hub) -> None:
    r = requests.get(f"{hub.url}/api/v1/health", timeout=30)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    key = register(hub)
    manifest, body, _ = make_batch("b-0001", 10)
    assert put(offer(hub, key, manifest).json()["upload_url"], body).status_code == 201
    admin = make_user(hub.db, "root", admin=True)
    gw = requests.get(f"{hub.url}/api/v1/gateways/{SERIAL}", auth=admin, timeout=30).json()
    assert gw["serial"] == SERIAL
    assert gw["domain"] == "default"
    assert gw["rows"] == 10
    assert gw["last_batch"]["batch_id"] == "b-0001"
    assert gw["last_seen"] is not None
    assert gw["last_heartbeat"] is None
    assert gw["status"] is None
    all_gw = requests.get(f"{hub.url}/api/v1/gateways", auth=admin, timeout=30).json()
    assert [g["serial"] for g in all_gw["gateways"]] == [SERIAL]
    r = requests.get(f"{hub.url}/api/v1/gateways/NOPE", auth=admin, timeout=30)
    assert r.status_code == 404
    assert "no gateway NOPE" in r.json()["error"]


def test_pin_is_one_time_and_bound_to_its_serial(hub: Hub) -> None:
    pin = hub.pin(SERIAL)
    other = requests.post(
        f"{hub.url}/api/v1/register", json={"pin": pin, "serial": "GW-OTHER"}, timeout=30
    )
    assert other.status_code == 403
    first = requests.post(
        f"{hub.url}/api/v1/register", json={"pin": pin, "serial": SERIAL}, timeout=30
    )
    assert first.status_code == 201
    again = requests.post(
        f"{hub.url}/api/v1/register", json={"pin": pin, "serial": SERIAL}, timeout=30
    )
    assert again.status_code == 403
    assert "already used" in again.json()["error"]
    bad = requests.post(f"{hub.url}/api/v1/register", data="nope", timeout=30)
    assert bad.status_code == 400
    # PINs are stored hashed, keys too
    held = hub.dump()
    assert pin not in held
    assert pin.replace("-", "") not in held
    assert first.json()["gateway_key"] not in held


def test_expired_pin_is_refused(hub: Hub) -> None:
    pin = hub.pin(SERIAL, "--valid-hours", "0.0003")  # about one second
    time.sleep(1.5)
    r = requests.post(f"{hub.url}/api/v1/register", json={"pin": pin, "serial": SERIAL}, timeout=30)
    assert r.status_code == 403
    assert "expired" in r.json()["error"]


def test_credentials_and_manifest_are_checked(hub: Hub) -> None:
    key = register(hub)
    manifest, _, _ = make_batch("b-0001", 5)
    r = requests.post(f"{hub.url}/api/v1/batches", json=manifest, timeout=30)
    assert r.status_code == 401
    assert "Authorization" in r.json()["error"]
    r = offer(hub, "wrong-key", manifest)
    assert r.status_code == 401
    assert "not valid" in r.json()["error"]
    r = offer(hub, key, {**manifest, "serial": "GW-OTHER"})
    assert r.status_code == 403
    assert f"belongs to gateway {SERIAL}" in r.json()["error"]
    for field, value, words in (
        ("rows", "many", "rows must be"),
        ("sha256", "abc", "sha256 must be"),
        ("mode", "PASS", "mode must be"),
        ("batch_id", "../x", "batch_id must be"),
    ):
        r = offer(hub, key, {**manifest, field: value})
        assert r.status_code == 422, r.text
        assert words in r.json()["error"]
    r = offer(hub, key, {k: v for k, v in manifest.items() if k != "first_ts"})
    assert r.status_code == 422
    assert "first_ts is missing" in r.json()["error"]
    # a key issued to a re-registered gateway replaces the old one
    new_key = register(hub)
    assert offer(hub, key, manifest).status_code == 401
    assert offer(hub, new_key, manifest).status_code == 201
    assert held(hub) == 0


def test_same_batch_any_number_of_times_is_stored_once(hub: Hub) -> None:
    key = register(hub)
    manifest, body, _ = make_batch("b-0001", 1000)
    r = offer(hub, key, manifest)
    assert r.status_code == 201
    url = r.json()["upload_url"]
    assert "expires_at" in r.json()
    second_url = offer(hub, key, manifest).json()["upload_url"]  # offered twice before stored
    r = put(url, body)
    assert r.status_code == 201
    assert r.json() == {"state": "stored", "rows": 1000, "new_rows": 1000}
    assert held(hub) == 1000
    assert put(second_url, body).status_code == 200
    assert put(url, body).status_code in (200, 403)
    # upload URLs are credentials until they expire: the access log shows no token
    for token in (url.rsplit("/", 1)[1], second_url.rsplit("/", 1)[1]):
        wait_until(
            lambda: "PUT /api/v1/uploads/" in hub.log_text(),
            timeout=10,
            what="the access log line of the upload",
        )
        assert token not in hub.log_text()
    r = offer(hub, key, manifest)
    assert r.status_code == 200
    assert r.json() == {"state": "stored"}
    # the same readings in another batch (a restored store re-sent them): still stored once
    m2, body2, _ = make_batch("b-0002", 1000)
    assert put(offer(hub, key, m2).json()["upload_url"], body2).json()["new_rows"] == 0
    assert held(hub) == 1000
    # the same batch id with other content is a conflict, not a silent skip
    m3, _, _ = make_batch("b-0001", 10, start=5000)
    r = offer(hub, key, m3)
    assert r.status_code == 409
    assert "already stored with other content" in r.json()["error"]


def test_bad_uploads_are_refused_and_store_nothing(hub: Hub) -> None:
    key = register(hub)
    manifest, body, data = make_batch("b-0001", 200)
    url = offer(hub, key, manifest).json()["upload_url"]

    tampered = data.replace(b"20.5\n", b"99.5\n", 1)
    r = put(url, zip_of(tampered, manifest))
    assert r.status_code == 409
    assert "checksum mismatch" in r.json()["error"]

    r = put(url, b"this is not a zip")
    assert r.status_code == 400
    assert "not a zip" in r.json()["error"]

    r = put(url, body[: len(body) // 2])
    assert r.status_code == 400

    r = put(url, zip_of(data, manifest, skip="manifest.yaml"))
    assert r.status_code == 422
    assert "no manifest.yaml" in r.json()["error"]

    r = put(url, zip_of(data, {**manifest, "rows": 199}))
    assert r.status_code == 422
    assert "manifest.yaml says rows 199" in r.json()["error"]

    r = put(f"{hub.url}/api/v1/uploads/not-a-token", body)
    assert r.status_code == 403
    assert "not valid" in r.json()["error"]

    # a manifest that lies about the row count, consistently inside and outside
    short, _, sdata = make_batch("b-0002", 200)
    short["rows"] = 201
    surl = offer(hub, key, short).json()["upload_url"]
    r = put(surl, zip_of(sdata, short))
    assert r.status_code == 422
    assert "announces 201 readings but readings.csv holds 200" in r.json()["error"]

    bad_rows = b"device,ts,metric,value\nTH-001,1767225600000,t,1.5\nTH-001,notatime,t,2\n"
    m4 = {
        **manifest,
        "batch_id": "b-0003",
        "rows": 2,
        "sha256": hashlib.sha256(bad_rows).hexdigest(),
    }
    r = put(offer(hub, key, m4).json()["upload_url"], zip_of(bad_rows, m4))
    assert r.status_code == 422
    assert "readings.csv line 3" in r.json()["error"]

    assert held(hub) == 0
    assert hub.query("SELECT COUNT(*) FROM batches")[0][0] == 0
    log = hub.log_text()
    assert "checksum mismatch" in log
    assert "not a zip" in log
    # the good upload still goes through on the same URL
    assert put(url, body).status_code == 201
    assert held(hub) == 200


def test_truncated_body_is_refused(hub: Hub) -> None:
    key = register(hub)
    manifest, body, _ = make_batch("b-0001", 500)
    url = urlsplit(offer(hub, key, manifest).json()["upload_url"])
    with socket.create_connection((hub.host, hub.port), timeout=30) as s:
        s.sendall(
            f"PUT {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/zip\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        s.sendall(body[: len(body) // 2])
        s.shutdown(socket.SHUT_WR)  # the line dropped: no more bytes will come
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 400 " in status_line, answer[:300]
    assert b"cut off" in rest
    assert held(hub) == 0
    assert "cut off after" in hub.log_text()
    assert put(f"{hub.url}{url.path}", body).status_code == 201
    assert held(hub) == 500


def test_oversize_and_expired_urls(tmp_path: Path, hub_db: str) -> None:
    hub = Hub(
        tmp_path / "hub", hub_db, extra_args=["--max-upload-mb", "0.01", "--upload-ttl-secs", "1"]
    )
    hub.start()
    try:
        key = register(hub)
        manifest, body, _ = make_batch("b-0001", 20000)
        assert len(body) > 0.01 * 1024 * 1024
        r = put(offer(hub, key, manifest).json()["upload_url"], body)
        assert r.status_code == 413
        assert "at most" in r.json()["error"]
        small, sbody, _ = make_batch("b-0002", 20)
        url = offer(hub, key, small).json()["upload_url"]
        time.sleep(1.5)
        r = put(url, sbody)
        assert r.status_code == 403
        assert "expired" in r.json()["error"]
        assert held(hub) == 0
    finally:
        hub.stop()


def test_test_mode_batches_are_flagged(hub: Hub) -> None:
    key = register(hub)
    manifest, body, _ = make_batch("b-0001", 30, mode="TEST")
    assert put(offer(hub, key, manifest).json()["upload_url"], body).status_code == 201
    assert hub.query("SELECT COUNT(*), SUM(test) FROM readings") == [(30, 30)]
    admin = make_user(hub.db, "root", admin=True)
    gw = requests.get(f"{hub.url}/api/v1/gateways/{SERIAL}", auth=admin, timeout=30).json()
    assert gw["test_rows"] == 30
    assert gw["last_batch"]["test"] is True


def test_storage_ingest_is_exactly_once_and_all_or_nothing(hub_db: str) -> None:
    st = open_storage(hub_db)
    rows = [("TH-1", T0 + i, "t", float(i)) for i in range(100)]
    assert st.ingest("GW-1", "import-a", iter(rows)) == 100
    assert st.ingest("GW-1", "import-a", iter(rows)) is None  # a batch is stored once
    assert st.ingest("GW-1", "import-b", iter(rows)) == 0  # its readings too
    assert st.ingest("GW-2", "import-a", iter(rows)) == 100  # another gateway's readings
    quoted = "import-o'brien's.db"
    assert st.ingest("GW-3", quoted, iter(rows[:3])) == 3
    assert query_db(hub_db, "SELECT DISTINCT batch_id FROM readings WHERE serial='GW-3'") == [
        (quoted,)
    ]
    # partly known: exactly the unknown rows are new, counted per device and metric
    more = [*rows[90:], *(("TH-2", T0 + i, "t", 1.0) for i in range(5))]
    assert st.ingest("GW-1", "import-c", iter(more)) == 5
    assert {(d["device"], d["count"]) for d in st.extent("GW-1")} == {("TH-1", 100), ("TH-2", 5)}

    def broken() -> Any:
        yield ("TH-1", T0 + 1000, "t", 1.0)
        raise IngestError("line 3: bad")

    with pytest.raises(IngestError):
        st.ingest("GW-1", "b-x", broken())
    with pytest.raises(IngestError):
        st.ingest("GW-1", "b-y", iter([*rows[:5], ("TH-1", T0 + 999, "t", 1.0)]), expected_rows=5)
    assert query_db(hub_db, "SELECT COUNT(*) FROM readings") == [(208,)]
    assert query_db(hub_db, "SELECT COUNT(*) FROM batches WHERE batch_id IN ('b-x', 'b-y')") == [
        (0,)
    ]
    assert st.gateway("GW-1")["rows"] == 105  # type: ignore[index]
    assert st.gateway("GW-1")["batches"] == 3  # type: ignore[index]
    st.close()


def test_hub_import_ingests_an_export_once(tmp_path: Path, hub_db: str) -> None:
    export = tmp_path / "data_store-GW-IMP.db"
    conn = store.open_store(export, "GW-IMP")
    with store.transaction(conn):
        store.insert_readings(conn, [("TH-1", T0 + i, "t", i / 3) for i in range(250)], source="t")
    conn.close()
    r = run_fieldgate("hub", "import", "--db", hub_db, str(export))
    assert r.returncode == 1  # no hub database there yet: a mistyped --db is not created
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("fieldgate: error: ")
    r = run_fieldgate("hub", "import", "--db", hub_db, "--create", str(export))
    assert r.returncode == 0, r.stderr
    assert "250 readings, 250 new" in r.stdout
    r = run_fieldgate("hub", "import", "--db", hub_db, str(export))
    assert "250 readings, 0 new" in r.stdout
    assert query_db(hub_db, "SELECT COUNT(*) FROM readings WHERE serial='GW-IMP'") == [(250,)]
    r = run_fieldgate("hub", "import", "--db", hub_db, str(tmp_path / "missing.db"))
    assert r.returncode == 1
    assert r.stderr.startswith("fieldgate: error: ") and "does not exist" in r.stderr


def test_serve_refuses_a_taken_port_in_one_line(hub: Hub, tmp_path: Path) -> None:
    r = run_fieldgate(
        "hub", "serve", "--db", str(tmp_path / "x.db"), "--listen", f"127.0.0.1:{hub.port}"
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"fieldgate: error: cannot listen on 127.0.0.1:{hub.port}: Address already in use"
    ]


def test_a_stopped_hub_closes_its_connections_and_logs_to_the_end(hub: Hub) -> None:
    """SIGTERM: each worker finishes, closes the storages of all its threads, flushes its
    log and leaves with status 0 without tearing its interpreter down
    (:func:`fieldgate.hub.server.exit_worker`), and so does the master once they are gone
    (:func:`fieldgate.hub.server.leave`): SQLite's last connection closed removes the WAL;
    PostgreSQL has no session of the hub left."""
    key = register(hub)
    for n in range(4):
        manifest, body, _ = make_batch(f"00000001-2026010100000{n}Z", 10, start=n * 10)
        r = offer(hub, key, manifest)
        assert r.status_code == 201, r.text
        assert put(r.json()["upload_url"], body).status_code == 201
    assert held(hub) == 40
    proc = hub.proc
    assert proc is not None
    hub.stop()
    assert proc.returncode == 0
    log = hub.log.read_text()
    assert log.count("Worker exiting (pid:") == hub.workers, log[-2000:]
    assert log.rstrip().endswith("Shutting down: Master"), log[-2000:]  # its last line
    if hub.postgresql:
        others = (
            "SELECT COUNT(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        wait_until(lambda: hub.query(others)[0][0] == 0, 10, what="the hub's sessions to end")
    else:
        assert not Path(f"{hub.db}-wal").exists()
    assert held(hub) == 40


def test_hub_db_holds_the_contract_table(hub: Hub) -> None:
    """docs/contract.md §6: readings(serial, device, ts, metric, value, …), readable by
    people and tools (a plain SQLite file, or a PostgreSQL view)."""
    if hub.postgresql:
        cols = [
            r[0]
            for r in hub.query(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'readings' ORDER BY ordinal_position"
            )
        ]
    else:
        cols = [r[1] for r in hub.query("PRAGMA table_info(readings)")]
        assert stat.S_ISREG(Path(hub.db).stat().st_mode)
    assert cols[:5] == ["serial", "device", "ts", "metric", "value"]
    assert json.loads(json.dumps(hub.query("SELECT value FROM meta")))


def test_serve_without_the_hub_extra_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway installs the glue without Flask and gunicorn (the ``hub`` extra)."""
    import logging
    import sys

    from fieldgate import cli

    root = logging.getLogger()  # main() sets up logging: give the root logger back afterwards
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in [m for m in sys.modules if m.startswith(("fieldgate.hub", "flask", "gunicorn"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flask", None)  # as if Flask were not installed
    argv = ["hub", "serve", "--db", str(tmp_path / "hub.db"), "--listen", "127.0.0.1:9"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        "fieldgate: error: 'fieldgate hub serve' needs the hub extra (Flask, gunicorn): "
        "pip install 'fieldgate[hub]'\n"
    )
    assert not (tmp_path / "hub.db").exists()
