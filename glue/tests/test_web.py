"""``fieldgate web``: the gateway page against a real store file, over real HTTP on
loopback, and the real command (config errors, SIGTERM). The browser test is
test_web_browser.py."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import sqlite3
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import free_port, run_fieldgate, start_fieldgate, stop_process, wait_for_port

from fieldgate import store
from fieldgate.config import load_config
from fieldgate.web import queries
from fieldgate.web.server import WebServer

HOUR = 3_600_000
DAY = 24 * HOUR


def fill(db: Path, now: int) -> None:
    """TH-001 (alias roof-temp) active: two metrics at different times; TH-002 silent for
    40 days; CSV-001 active with a day of 5-minute readings and one older than a day."""
    conn = store.open_store(db, "GW-TEST")
    with store.transaction(conn):
        store.insert_readings(
            conn,
            [
                ("TH-001", now - 60_000, "temperature", 21.5),
                ("TH-001", now - 60_000, "humidity", 40.0),
                ("TH-001", now - 120_000, "temperature", 21.0),
                ("TH-001", now - 5_000, "battery", 3.1),
                ("TH-002", now - 40 * DAY, "temperature", 5.0),
                ("CSV-001", now - DAY - 1, "temperature", 99.0),  # just outside its day
            ],
            source="test",
        )
        store.insert_readings(
            conn,
            [("CSV-001", now - i * 300_000, "temperature", 10 + i / 10) for i in range(288)],
            source="test",
        )
    conn.close()


@pytest.fixture
def site(config_file, tmp_path) -> Iterator[tuple[WebServer, int]]:
    cfg = load_config(str(config_file(overrides={"web": {"hide_inactive_after_days": 30}})))
    cfg = dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, port=0))
    now = store.now_ms()
    fill(Path(cfg.store.path), now)
    server = WebServer(cfg)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, now
    finally:
        server.shutdown()
        server.server_close()


def get(server: WebServer, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(server.url + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_latest_page_lists_active_devices_and_hides_inactive_ones(site):
    server, _ = site
    status, body, headers = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'data-device="TH-001"' in body and "roof-temp" in body
    assert 'data-device="CSV-001"' in body
    assert 'data-device="TH-002"' not in body
    assert "1 device silent for more than 30 days not shown" in body
    status, body, _ = get(server, "/?all=true")
    assert 'data-device="TH-002"' in body and "not shown" not in body


def test_latest_json_has_the_latest_value_of_every_metric(site):
    server, now = site
    status, body, _ = get(server, "/api/v1/latest")
    data = json.loads(body)
    assert status == 200 and data["hidden"] == 1
    assert [d["device"] for d in data["devices"]] == ["CSV-001", "TH-001"]  # latest first
    th = data["devices"][1]
    assert th["alias"] == "roof-temp" and th["last_ts"] == now - 5_000
    assert th["metrics"] == {
        "battery": {"ts": now - 5_000, "value": 3.1},
        "humidity": {"ts": now - 60_000, "value": 40.0},
        "temperature": {"ts": now - 60_000, "value": 21.5},
    }
    data = json.loads(get(server, "/api/v1/latest?all=true")[1])
    assert data["hidden"] == 0 and len(data["devices"]) == 3


def test_device_day_as_json_raw_and_in_buckets(site):
    server, now = site
    status, body, _ = get(server, "/api/v1/devices/CSV-001/day")
    data = json.loads(body)
    assert status == 200 and data["to"] == now and data["from"] == now - DAY
    points = data["metrics"]["temperature"]
    assert len(points) == 288  # the reading older than the day is left out
    assert points[0] == {"ts": now - 287 * 300_000, "value": 10 + 287 / 10}
    assert points[-1] == {"ts": now, "value": 10.0}
    data = json.loads(get(server, "/api/v1/devices/CSV-001/day?every=3600")[1])
    buckets = data["metrics"]["temperature"]
    assert data["every"] == 3600 and sum(b["count"] for b in buckets) == 288
    assert all(b["ts"] % HOUR == 0 and b["min"] <= b["mean"] <= b["max"] for b in buckets)
    assert get(server, "/api/v1/devices/CSV-001/day?every=0")[0] == 400
    status, body, _ = get(server, "/api/v1/devices/NOPE/day")
    assert status == 404 and json.loads(body) == {
        "error": "no readings of device 'NOPE' in the store"
    }


def test_device_page_carries_its_chart_data(site):
    server, _ = site
    status, body, headers = get(server, "/devices/TH-001")
    assert status == 200 and "every reading" in body
    assert "/static/vendor/uplot/uPlot.iife.min.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert get(server, "/devices/TH-002")[0] == 200  # an inactive device keeps its last day
    assert get(server, "/devices/NOPE")[0] == 404


def test_a_long_day_is_charted_in_buckets(config_file):
    cfg = load_config(str(config_file(overrides={"web": {"chart_max_points": 100}})))
    now = store.now_ms()
    fill(Path(cfg.store.path), now)
    conn = queries.open_readonly(cfg)
    assert conn is not None
    every = queries.chart_every(conn, "CSV-001", 100)
    assert every == 873  # 86400 s over 99 buckets, rounded up
    day = queries.device_day(conn, cfg, "CSV-001", every=every)
    assert day is not None and len(day.metrics["temperature"]) <= 100
    assert queries.chart_every(conn, "TH-001", 100) is None


def test_status_page_and_json(site):
    server, _ = site
    status, body, _ = get(server, "/status")
    assert status == 200 and "site            GW-TEST" in body
    data = json.loads(get(server, "/api/v1/status")[1])
    assert data["site"] == "GW-TEST" and data["readings"]["total"] == 294


def test_static_files_and_what_is_refused(site):
    server, _ = site
    status, body, headers = get(server, "/static/vendor/uplot/uPlot.iife.min.js")
    assert status == 200 and "uPlot" in body and headers["Content-Type"].startswith("text/java")
    assert get(server, "/static/gateway/gateway.css")[0] == 200
    assert get(server, "/static/../config.py")[0] == 404
    assert get(server, "/static/gateway/")[0] == 404
    status, body, _ = get(server, "/", method="HEAD")
    assert status == 200 and body == ""
    assert get(server, "/", method="POST")[0] == 501


def test_no_store_yet_is_said_not_crashed(config_file):
    cfg = load_config(str(config_file()))
    cfg = dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, port=0))
    server = WebServer(cfg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, body, _ = get(server, "/")
        assert status == 503 and "does not exist yet" in body
        assert get(server, "/api/v1/latest")[0] == 503
        assert get(server, "/status")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_reads_without_blocking_the_writer(config_file):
    """A read transaction of the page held open: the collector still commits at once, and
    the page's connection cannot write."""
    cfg = load_config(str(config_file()))
    fill(Path(cfg.store.path), store.now_ms())
    reader = queries.open_readonly(cfg)
    assert reader is not None
    reader.execute("BEGIN")
    reader.execute(queries.DEVICES_SQL).fetchall()
    writer = store.connect(cfg.store.path, busy_timeout_ms=100)
    with store.transaction(writer):
        store.insert_readings(writer, [("TH-001", 1, "t", 1.0)], source="test")
    reader.execute("COMMIT")
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only|query_only"):
        reader.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")


@pytest.mark.parametrize(
    "sql",
    [queries.DEVICES_SQL, queries.LATEST_SQL, queries.RAW_SQL, queries.BUCKETS_SQL],
    ids=["devices", "latest", "raw", "buckets"],
)
def test_queries_walk_the_index_not_the_table(config_file, sql):
    """On a store of millions of rows a scan is seconds: every page query must search the
    (device, ts, metric) index."""
    cfg = load_config(str(config_file()))
    fill(Path(cfg.store.path), store.now_ms())
    conn = queries.open_readonly(cfg)
    assert conn is not None
    params = [None] * sql.count("?")
    plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "SCAN readings" not in plan and "SCAN r " not in plan, plan
    assert "sqlite_autoindex_readings_1" in plan, plan


def test_the_command_serves_and_stops_on_sigterm(config_file, tmp_path):
    port = free_port()
    config = config_file(overrides={"web": {"listen_address": "127.0.0.1", "port": port}})
    fill(Path(yaml.safe_load(config.read_text())["store"]["path"]), store.now_ms())
    proc = start_fieldgate("web", config=config, log=tmp_path / "web.log")
    try:
        wait_for_port("127.0.0.1", port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"roof-temp" in r.read()
    finally:
        code = stop_process(proc, signal.SIGTERM, timeout=10)
    assert code == 0
    assert "stopped (SIGTERM)" in (tmp_path / "web.log").read_text()


@pytest.mark.parametrize(
    ("web", "message"),
    [
        ({"port": "x"}, "web.port: expected an integer, got string 'x'"),
        ({"listen_address": "eth0"}, "web.listen_address: 'eth0' is not a valid value here"),
        ({"listen_address": "10.0.0.300"}, "web.listen_address: '10.0.0.300' is not an IP"),
        ({"hide_inactive_after_days": 0}, "web.hide_inactive_after_days: must be at least"),
        ({"colour": "blue"}, "web.colour: unknown key"),
    ],
)
def test_bad_web_config_is_one_line_and_exit_2(config_file, web, message):
    r = run_fieldgate("web", config=config_file(overrides={"web": web}))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_a_taken_port_is_one_line(config_file):
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = run_fieldgate("web", config=config_file(overrides={"web": {"port": port}}))
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
