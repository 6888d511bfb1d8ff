"""``fieldgate poll`` against a real HTTP server on loopback: good, slow, dead and bad nodes."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import (
    ConfigFactory,
    count_rows,
    free_port,
    run_fieldgate,
    start_fieldgate,
    stop_process,
    wait_until,
)
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from fieldgate.redact import without_userinfo

T0 = 1_767_225_600_000


class Nodes:
    """A real HTTP server whose paths play sensor nodes; counts every request."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.release = threading.Event()  # /hang answers only once this is set
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def app(self, environ: dict, start_response):  # type: ignore[no-untyped-def]
        req = Request(environ)
        self.hits[req.path] += 1
        if req.path == "/good":
            body = json.dumps({"ts": T0, "metrics": {"temperature": 21.5, "humidity": 40}})
            resp = Response(body, mimetype="application/json")
        elif req.path == "/array":
            body = json.dumps([{"ts": T0 + i * 1000, "metrics": {"level": i}} for i in range(3)])
            resp = Response(body, mimetype="application/json")
        elif req.path == "/csv":
            resp = Response(f"ts,temperature,humidity\n{T0},19.5,55\n", mimetype="text/csv")
        elif req.path == "/slow":
            time.sleep(2)
            resp = Response(json.dumps({"ts": T0, "metrics": {"x": 1}}))
        elif req.path == "/hang":
            self.release.wait(60)
            resp = Response(json.dumps({"ts": T0 + 5000, "metrics": {"x": 2}}))
        elif req.path == "/isems.csv":  # an ISEMS node's log, served over HTTP
            lines = [
                f"isems-7;1;{T0 // 1000 + 60 * i};FF-ESP32-1A;3600;0;{20 + i / 10};17.3;13.2;95"
                for i in range(3)
            ]
            resp = Response("\n".join(lines) + "\n", mimetype="text/csv")
        elif req.path == "/cm":  # Tasmota's HTTP API: cm?cmnd=Status%2010 (sensors)
            body = {
                "StatusSNS": {
                    "Time": "2026-01-01T01:00:00",
                    "AM2301": {"Temperature": 20.1, "Humidity": 58.2},
                    "TempUnit": "C",
                }
            }
            resp = Response(json.dumps(body), mimetype="application/json")
        elif req.path == "/garbage":
            resp = Response("<html>not json</html>", mimetype="text/html")
        else:
            resp = Response("boom", status=500)
        return resp(environ, start_response)

    def __enter__(self) -> Nodes:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    with Nodes() as n:
        yield n


def poll_config(config_file: ConfigFactory, nodes: list[dict], **poll: object) -> Path:
    return config_file(
        overrides={"poll": {"interval_secs": 1, "timeout_secs": 1, **poll, "nodes": nodes}}
    )


def db_of(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["store"]["path"])


def test_once_stores_every_good_node(config_file: ConfigFactory, nodes: Nodes) -> None:
    config = poll_config(
        config_file,
        [
            {"name": "a", "url": f"{nodes.base}/good", "device": "roof-temp"},
            {"name": "b", "url": f"{nodes.base}/array", "device": "TH-002"},
            {"name": "c", "url": f"{nodes.base}/csv", "device": "CSV-001"},
        ],
    )
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 0, r
    db = db_of(config)
    conn = sqlite3.connect(str(db))
    rows = conn.execute(
        "SELECT device, ts, metric, value, source FROM readings ORDER BY device, ts, metric"
    ).fetchall()
    conn.close()
    assert rows == [
        ("CSV-001", T0, "humidity", 55.0, "poll:c"),
        ("CSV-001", T0, "temperature", 19.5, "poll:c"),
        ("TH-001", T0, "humidity", 40.0, "poll:a"),
        ("TH-001", T0, "temperature", 21.5, "poll:a"),
        ("TH-002", T0, "level", 0.0, "poll:b"),
        ("TH-002", T0 + 1000, "level", 1.0, "poll:b"),
        ("TH-002", T0 + 2000, "level", 2.0, "poll:b"),
    ]
    # polling again stores nothing twice
    assert run_fieldgate("poll", "--once", config=config).returncode == 0
    assert count_rows(db, "readings") == 7


def test_once_names_dead_slow_and_bad_nodes_and_stores_the_rest(
    config_file: ConfigFactory, nodes: Nodes
) -> None:
    dead = free_port()
    config = poll_config(
        config_file,
        [
            {"name": "good", "url": f"{nodes.base}/good", "device": "TH-001"},
            {"name": "dead", "url": f"http://127.0.0.1:{dead}/x", "device": "TH-002"},
            {"name": "slow", "url": f"{nodes.base}/slow", "device": "TH-002", "timeout_secs": 0.3},
            {"name": "broken", "url": f"{nodes.base}/error", "device": "TH-002"},
            {"name": "junk", "url": f"{nodes.base}/garbage", "device": "TH-002"},
        ],
    )
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("fieldgate: error: ")]
    assert len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0], r.stderr
    line = errors[0]
    assert line.startswith("fieldgate: error: poll failed for 4 of 5 nodes: ")
    assert "dead (cannot connect: Connection refused)" in line
    assert "slow (timed out after 0.3 s)" in line
    assert "broken (HTTP 500 INTERNAL SERVER ERROR)" in line
    assert "junk (rejected: bad JSON" in line
    db = db_of(config)
    assert count_rows(db, "readings") == 2
    assert count_rows(db, "rejected", "source = 'poll:junk' AND reason LIKE 'bad JSON%'") == 1


def test_a_nodes_credentials_reach_no_row_and_no_log(
    config_file: ConfigFactory, nodes: Nodes
) -> None:
    """Issue 15: a poll URL with user:password@ was kept whole in the rejected row's topic."""
    secret_url = nodes.base.replace("http://", "http://fg-reader:s3cret-Pa55@") + "/garbage"
    config = poll_config(config_file, [{"name": "junk", "url": secret_url, "device": "TH-002"}])
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 1, r
    assert nodes.hits["/garbage"] == 1  # the credentials were used: only their text is gone
    assert "s3cret" not in r.stderr and "fg-reader" not in r.stderr, r.stderr
    conn = sqlite3.connect(str(db_of(config)))
    rows = conn.execute("SELECT topic, source, reason, payload FROM rejected").fetchall()
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert [(t, s) for t, s, _r, _p in rows] == [(f"{nodes.base}/garbage", "poll:junk")]
    assert "s3cret" not in dump and "fg-reader" not in dump


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:p@host:8080/a?b=c", "http://host:8080/a?b=c"),
        ("https://user@host/x", "https://host/x"),
        ("http://u:p@ss@host/x@y", "http://host/x@y"),  # up to the last @ before the path
        ("http://host/path?to=a@b", "http://host/path?to=a@b"),  # an @ after the host stays
        ("http://[::1]:80/x", "http://[::1]:80/x"),
    ],
)
def test_without_userinfo(url: str, shown: str) -> None:
    assert without_userinfo(url) == shown


def test_a_hanging_node_does_not_hold_up_the_others(
    config_file: ConfigFactory, nodes: Nodes, tmp_path: Path
) -> None:
    config = poll_config(
        config_file,
        [
            {"name": "hang", "url": f"{nodes.base}/hang", "device": "TH-002", "timeout_secs": 120},
            {"name": "good", "url": f"{nodes.base}/good", "device": "TH-001"},
        ],
        interval_secs=1,
    )
    db = db_of(config)
    proc = start_fieldgate("poll", config=config, log=tmp_path / "poll.log")
    try:
        wait_until(
            lambda: nodes.hits["/good"] >= 3, timeout=60, what="three polls of the good node"
        )
        # the hanging node's first request is still out and was not sent again
        assert nodes.hits["/hang"] == 1
        assert count_rows(db, "readings") == 2
        assert count_rows(db, "readings", "device = 'TH-002'") == 0
        nodes.release.set()
        wait_until(lambda: count_rows(db, "readings", "device = 'TH-002'") == 1)
        assert proc.poll() is None
    finally:
        rc = stop_process(proc, signal.SIGTERM, timeout=10)
    assert rc == 0, (tmp_path / "poll.log").read_text()
    conn = sqlite3.connect(str(db))
    state = conn.execute("SELECT value FROM state WHERE key = 'poller.state'").fetchone()[0]
    conn.close()
    assert state == "stopped"


def test_sigterm_stops_within_10_seconds_while_a_node_hangs(
    config_file: ConfigFactory, nodes: Nodes, tmp_path: Path
) -> None:
    config = poll_config(
        config_file,
        [{"name": "hang", "url": f"{nodes.base}/hang", "device": "TH-002", "timeout_secs": 300}],
    )
    proc = start_fieldgate("poll", config=config, log=tmp_path / "poll.log")
    wait_until(lambda: nodes.hits["/hang"] == 1, what="the hanging request")
    started = time.monotonic()
    rc = stop_process(proc, signal.SIGTERM, timeout=10)
    assert rc == 0
    assert time.monotonic() - started < 10


def test_no_nodes_is_a_config_error(config_file: ConfigFactory) -> None:
    config = config_file()
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 2, r
    assert r.stderr == (
        f"fieldgate: error: {config}: poll.nodes and poll.modbus are empty: "
        "there is nothing to poll\n"
    )


def test_nodes_are_read_in_their_format(config_file: ConfigFactory, nodes: Nodes) -> None:
    """An ISEMS node's CSV log and a Tasmota device's JSON status page, polled directly."""
    config = config_file(
        overrides={
            "devices": {"list": [{"serial": "isems-7"}, {"serial": "TH-001"}]},
            "poll": {
                "nodes": [
                    {
                        "name": "isems",
                        "url": f"{nodes.base}/isems.csv",
                        "device": "isems-7",
                        "format": "csv",
                        "csv": {
                            "delimiter": ";",
                            "columns": ["device", "-", "ts", "-", "time_to_shutdown", "-", "voc"],
                            "ts_unit": "s",
                        },
                    },
                    {
                        "name": "tasmota",
                        "url": f"{nodes.base}/cm?cmnd=Status%2010",
                        "device": "TH-001",
                        "format": "json",
                        "ts_path": "StatusSNS.Time",
                        "metrics_path": "StatusSNS",
                        "timezone": "Europe/Berlin",
                    },
                ]
            },
        }
    )
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 0, r
    db = db_of(config)
    conn = sqlite3.connect(str(db))
    rows = conn.execute(
        "SELECT device, ts, metric, value, source FROM readings ORDER BY device, ts, metric"
    ).fetchall()
    state = conn.execute("SELECT value FROM state WHERE key = 'poller.node.tasmota'").fetchone()
    conn.close()
    assert rows == [
        ("TH-001", T0, "AM2301.Humidity", 58.2, "poll:tasmota"),
        ("TH-001", T0, "AM2301.Temperature", 20.1, "poll:tasmota"),
        ("isems-7", T0, "time_to_shutdown", 3600.0, "poll:isems"),
        ("isems-7", T0, "voc", 20.0, "poll:isems"),
        ("isems-7", T0 + 60000, "time_to_shutdown", 3600.0, "poll:isems"),
        ("isems-7", T0 + 60000, "voc", 20.1, "poll:isems"),
        ("isems-7", T0 + 120000, "time_to_shutdown", 3600.0, "poll:isems"),
        ("isems-7", T0 + 120000, "voc", 20.2, "poll:isems"),
    ]
    assert state == ("ok: 2 readings, 1 values skipped (not numbers)",)
