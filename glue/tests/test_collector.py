"""``fieldgate collect`` against a real Mosquitto and a real store file, as a real process."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import (
    Broker,
    Collector,
    ConfigFactory,
    count_rows,
    publish,
    reading_payload,
    run_fieldgate,
    running,
    state,
    stop_process,
    wait_until,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in epoch ms


def stream(n: int, device: str = "TH-001", start: int = 0) -> list[tuple[str, str]]:
    """``n`` messages of two metrics each, one second apart."""
    return [
        (
            f"fieldgate/{device}/readings",
            reading_payload(T0 + (start + i) * 1000, temperature=20 + i % 7, humidity=40.5),
        )
        for i in range(n)
    ]


@pytest.fixture
def collector(mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path) -> Iterator[Collector]:
    c = Collector(config_file(broker=mosquitto), tmp_path / "collector.log")
    yield c
    if c.proc is not None and c.proc.poll() is None:
        stop_process(c.proc, signal.SIGKILL)


def test_n_readings_give_n_rows_and_republishing_adds_none(
    mosquitto: Broker, collector: Collector
) -> None:
    collector.start()
    messages = stream(500)
    publish(mosquitto, messages)
    wait_until(lambda: collector.readings() == 1000, what="1000 readings")
    publish(mosquitto, messages)
    # a marker published after the repeats proves the repeats were processed
    publish(mosquitto, stream(1, device="TH-002"))
    wait_until(lambda: count_rows(collector.db, "readings", "device = 'TH-002'") == 2)
    assert collector.stop() == 0
    assert collector.readings() == 1002
    assert count_rows(collector.db, "rejected") == 0
    assert state(collector.db) == "stopped"
    conn = sqlite3.connect(str(collector.db))
    row = conn.execute(
        "SELECT device, ts, metric, value, source FROM readings ORDER BY id LIMIT 1"
    ).fetchone()
    conn.close()
    assert row == ("TH-001", T0, "temperature", 20.0, "mqtt")


def test_alias_is_stored_as_serial_and_csv_device_is_parsed(
    mosquitto: Broker, collector: Collector
) -> None:
    collector.start()
    publish(
        mosquitto,
        [
            ("fieldgate/roof-temp/readings", reading_payload(T0, temperature=1.5)),
            ("fieldgate/CSV-001/readings", f"ts,temperature,humidity\n{T0},21.5,40\n"),
            (
                "fieldgate/TH-002/readings",
                json.dumps(
                    [
                        {"ts": "2026-01-01T00:00:01Z", "metrics": {"a": 1}},
                        {"ts": "2026-01-01T01:00:02+01:00", "metrics": {"a": 2}},
                    ]
                ),
            ),
        ],
    )
    wait_until(lambda: collector.readings() == 5, what="5 readings")
    collector.stop()
    conn = sqlite3.connect(str(collector.db))
    rows = conn.execute("SELECT device, ts, metric, value FROM readings ORDER BY id").fetchall()
    conn.close()
    assert rows == [
        ("TH-001", T0, "temperature", 1.5),
        ("CSV-001", T0, "temperature", 21.5),
        ("CSV-001", T0, "humidity", 40.0),
        ("TH-002", T0 + 1000, "a", 1.0),
        ("TH-002", T0 + 2000, "a", 2.0),
    ]


def test_sigkill_mid_stream_then_restart_stores_every_reading_once(
    mosquitto: Broker, collector: Collector
) -> None:
    collector.start()
    total = 6000
    publisher = threading.Thread(target=publish, args=(mosquitto, stream(total)))
    publisher.start()
    wait_until(lambda: collector.readings() > 0, what="the first readings")
    assert collector.proc is not None
    pid = collector.proc.pid
    writers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(writers) == 1  # the store writer process
    collector.stop(signal.SIGKILL)
    # the writer notices its collector is gone and exits: no orphan holds the store
    wait_until(lambda: not running(int(writers[0])), what="the writer to exit")
    stored_at_kill = collector.readings()
    publisher.join()
    collector.start()
    wait_until(lambda: collector.readings() == 2 * total, what=f"{2 * total} readings")
    collector.stop()
    assert 0 < stored_at_kill < 2 * total
    assert collector.readings() == 2 * total
    conn = sqlite3.connect(str(collector.db))
    dupes = conn.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM readings GROUP BY device, ts, metric "
        "HAVING COUNT(*) > 1)"
    ).fetchone()[0]
    conn.close()
    assert dupes == 0
    assert count_rows(collector.db, "rejected") == 0


def test_backlog_published_while_stopped_arrives_after_restart(
    mosquitto: Broker, collector: Collector
) -> None:
    collector.start()
    publish(mosquitto, stream(100))
    wait_until(lambda: collector.readings() == 200)
    # publishing goes on while the collector is stopped (SIGTERM) in the middle of it
    publisher = threading.Thread(target=publish, args=(mosquitto, stream(3000, start=100)))
    publisher.start()
    wait_until(lambda: collector.readings() > 200, what="part of the stream")
    assert collector.stop() == 0
    at_stop = collector.readings()
    publisher.join()
    assert collector.readings() == at_stop  # nobody collects while it is stopped
    assert at_stop < 6200
    publish(mosquitto, stream(1000, start=3100))  # and more once the stream has ended
    collector.start()
    wait_until(lambda: collector.readings() == 8200, what="the backlog")
    assert collector.stop() == 0
    assert collector.readings() == 8200
    assert count_rows(collector.db, "rejected") == 0


def test_broker_restart_is_survived(mosquitto: Broker, collector: Collector) -> None:
    collector.start()
    publish(mosquitto, stream(50))
    wait_until(lambda: collector.readings() == 100)
    mosquitto.restart()
    publish(mosquitto, stream(50, start=50))
    wait_until(lambda: collector.readings() == 200, what="readings after the broker restart")
    assert collector.alive()
    assert collector.stop() == 0
    log = collector.log.read_text()
    assert "lost the connection to broker" in log or "cannot reach broker" in log


MALFORMED: list[tuple[str, bytes, str]] = [
    ("fieldgate/TH-001/readings", b"{not json", "bad JSON"),
    ("fieldgate/TH-001/readings", b'"a string"', "expected a JSON object or array, got a string"),
    ("fieldgate/TH-001/readings", b"[]", "empty JSON array"),
    ("fieldgate/TH-001/readings", b"\xff\xfe\x00garbage", "not valid UTF-8"),
    ("fieldgate/UNKNOWN-9/readings", reading_payload(T0, t=1).encode(), "unknown device"),
    ("fieldgate/TH-001/readings", b'{"metrics": {"t": 1}}', "ts: missing"),
    ("fieldgate/TH-001/readings", json.dumps({"ts": T0}).encode(), "metrics: missing"),
    ("fieldgate/TH-001/readings", json.dumps({"ts": T0, "metrics": {}}).encode(), "empty"),
    (
        "fieldgate/TH-001/readings",
        json.dumps({"ts": T0, "metrics": {"t": "warm"}}).encode(),
        'metrics.t: "warm" is not a number',
    ),
    (
        "fieldgate/TH-001/readings",
        json.dumps({"ts": T0, "metrics": {"t": None}}).encode(),
        "missing value",
    ),
    ("fieldgate/TH-001/readings", b'{"ts": 1767225600000, "metrics": {"t": NaN}}', "NaN"),
    ("fieldgate/TH-001/readings", b'{"ts": 1767225600000, "metrics": {"t": Infinity}}', "Inf"),
    (
        "fieldgate/TH-001/readings",
        json.dumps({"ts": T0, "metrics": {"t": True}}).encode(),
        "true is not a number",
    ),
    (
        "fieldgate/TH-001/readings",
        json.dumps({"ts": 1767225600, "metrics": {"t": 1}}).encode(),
        "seconds instead of milliseconds",
    ),
    (
        "fieldgate/TH-001/readings",
        json.dumps({"ts": "2999-01-01T00:00:00Z", "metrics": {"t": 1}}).encode(),
        "in the future",
    ),
    (
        "fieldgate/TH-001/readings",
        json.dumps({"ts": "yesterday", "metrics": {"t": 1}}).encode(),
        "not an RFC 3339 date-time",
    ),
    (
        "fieldgate/TH-001/readings",
        json.dumps({"ts": T0, "metrics": {"bad name,x": 1}}).encode(),
        "metric name",
    ),
    ("fieldgate/TH-001/readings", b"x" * 5000, "over mqtt.max_payload_bytes"),
    ("fieldgate/CSV-001/readings", b"1767225600000,21.5\n", "2 fields, expected 3"),
    ("fieldgate/CSV-001/readings", b"1767225600000,hot,40\n", "'hot' is not a number"),
]


def test_malformed_corpus_is_rejected_with_reasons_and_neighbours_are_stored(
    mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = config_file(broker=mosquitto, overrides={"mqtt": {"max_payload_bytes": 4096}})
    c = Collector(config, tmp_path / "collector.log")
    c.start()
    try:
        messages: list[tuple[str, bytes | str]] = []
        for i, (topic, payload, _) in enumerate(MALFORMED):
            messages.append(stream(1, start=i)[0])  # a valid neighbour before each bad one
            messages.append((topic, payload))
        messages.append(stream(1, start=len(MALFORMED))[0])
        # an array with one bad element: the good elements are stored, the message kept
        messages.append(
            (
                "fieldgate/TH-002/readings",
                json.dumps(
                    [
                        {"ts": T0, "metrics": {"x": 1}},
                        {"ts": T0 + 1000, "metrics": {"x": "bad"}},
                        {"ts": T0 + 2000, "metrics": {"x": 3}},
                    ]
                ),
            )
        )
        publish(mosquitto, messages)
        expected_readings = 2 * (len(MALFORMED) + 1) + 2
        wait_until(
            lambda: (
                count_rows(c.db, "rejected") == len(MALFORMED) + 1
                and c.readings() == expected_readings
            ),
            what="every message processed",
        )
        assert c.alive()
        # still collecting after the corpus
        publish(mosquitto, stream(1, device="TH-002", start=100))
        wait_until(lambda: c.readings() == expected_readings + 2)
        assert c.alive()
    finally:
        assert c.stop() == 0
    conn = sqlite3.connect(str(c.db))
    rejected = conn.execute(
        "SELECT topic, payload, reason, source FROM rejected ORDER BY id"
    ).fetchall()
    conn.close()
    assert len(rejected) == len(MALFORMED) + 1
    for (topic, payload, expected), (r_topic, r_payload, reason, source) in zip(
        MALFORMED, rejected, strict=False
    ):
        assert r_topic == topic
        assert source == "mqtt"
        assert expected in reason, (payload, reason)
        raw = r_payload.encode() if isinstance(r_payload, str) else r_payload
        assert raw == payload[:4096]
    assert rejected[-1][2].startswith("1 of 3 samples rejected, the other 2 stored: element 1:")
    assert count_rows(c.db, "readings", "device = 'TH-002' AND metric = 'x'") == 2


def test_wrong_password_keeps_retrying_with_one_clear_line(
    mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = config_file(broker=mosquitto)
    secret = Path(yaml.safe_load(config.read_text())["mqtt"]["password_file"])
    secret.write_text("Xq9-not-the-password\n")
    c = Collector(config, tmp_path / "collector.log")
    c.start(wait_running=False)
    wait_until(
        lambda: "refused the login" in c.log.read_text(), timeout=30, what="the refusal line"
    )
    assert c.alive()
    line = next(x for x in c.log.read_text().splitlines() if "refused the login" in x)
    assert f"broker 127.0.0.1:{mosquitto.port} refused the login: bad user name or password" in line
    assert "Xq9-not-the-password" not in c.log.read_text()
    # the state is written beside the log line, not necessarily before it
    wait_until(
        lambda: (state(c.db) or "").startswith("connecting: broker 127.0.0.1"),
        timeout=30,
        what="the connecting state",
    )
    assert c.stop() == 0


def test_unreachable_broker_keeps_retrying_and_connects_when_it_appears(
    mosquitto: Broker, collector: Collector
) -> None:
    mosquitto.stop()
    collector.start(wait_running=False)
    wait_until(lambda: "cannot reach broker" in collector.log.read_text(), timeout=30)
    line = next(x for x in collector.log.read_text().splitlines() if "cannot reach broker" in x)
    assert f"cannot reach broker 127.0.0.1:{mosquitto.port}: Connection refused" in line
    assert collector.alive()
    mosquitto.start()
    wait_until(lambda: state(collector.db) == "running", timeout=30, what="reconnect")
    publish(mosquitto, stream(10))
    wait_until(lambda: collector.readings() == 20)
    assert collector.stop() == 0


def test_sigterm_stops_within_10_seconds_and_reports_stopped(
    mosquitto: Broker, collector: Collector
) -> None:
    collector.start()
    publish(mosquitto, stream(10))
    wait_until(lambda: collector.readings() == 20)
    assert collector.proc is not None
    started = time.monotonic()
    collector.proc.send_signal(signal.SIGTERM)
    rc = collector.proc.wait(10)
    assert time.monotonic() - started < 10
    assert rc == 0
    collector.proc = None
    assert state(collector.db) == "stopped"
    assert "stopped on SIGTERM" in collector.log.read_text()


def test_status_shows_collector_state(mosquitto: Broker, collector: Collector) -> None:
    collector.start()
    publish(mosquitto, stream(3))
    wait_until(lambda: collector.readings() == 6)
    r = run_fieldgate("status", "--json", config=collector.config)
    assert r.returncode == 0, r
    s = json.loads(r.stdout)
    assert s["collector"]["state"]["value"] == "running"
    assert s["collector"]["heartbeat"] is not None
    assert s["readings"]["total"] == 6
    collector.stop()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", "mqtt.password_file: secret file {p} does not exist"),
        ("unreadable", "mqtt.password_file: cannot read secret file {p}"),
        ("empty", "mqtt.password_file: secret file {p} is empty"),
        ("tls", "mqtt.tls_ca_file: {d}/no-ca.pem does not exist"),
        ("no-user", "mqtt.password_file is set but mqtt.username is not"),
    ],
)
def test_collector_config_errors_exit_2_with_one_line(
    config_file: ConfigFactory, tmp_path: Path, change: str, message: str
) -> None:
    overrides: dict = {}
    if change == "tls":
        overrides = {"mqtt": {"tls_ca_file": str(tmp_path / "no-ca.pem")}}
    if change == "no-user":
        overrides = {"mqtt": {"username": None}}
    config = config_file(overrides=overrides)
    secret = Path(yaml.safe_load(config.read_text())["mqtt"]["password_file"])
    if change == "missing":
        secret.unlink()
    elif change == "empty":
        secret.write_text("\n")
    elif change == "unreadable":
        secret.unlink()
        secret.mkdir()  # unreadable as a file even for root
    r = run_fieldgate("collect", config=config, timeout=30)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1, r.stderr
    expected = message.format(p=secret, d=tmp_path)
    assert r.stderr.startswith("fieldgate: error: ") and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
