"""The broker on a bad day (issue 15): a device account cannot take the collector's session,
and a killed broker loses at most the last half second of acknowledged readings.

Real Mosquitto (the plugin ``fieldgate broker-conf`` names), the real collector, real stores.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from support import (
    DEPLOYED_AUTOSAVE,
    MOSQUITTO_PASSWD,
    SENSOR_PASSWORD,
    SENSOR_USER,
    Broker,
    Collector,
    ConfigFactory,
    publish,
    publish_denied,
    reading_payload,
    run_fieldgate,
    wait_until,
)

TOPIC = "fieldgate/TH-001/readings"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
# Another device's account: the one that attacks
INTRUDER, INTRUDER_PASSWORD = "TH-002", "th-002-secret"


def collector_id(config: Path) -> str:
    return str(yaml.safe_load(config.read_text())["mqtt"]["client_id"])


def publish_paced(
    host: str, port: int, n: int, rate: float, *, first: int = 0, client_id: str = ""
) -> int:
    """n QoS 1 readings (distinct timestamps from ``first``), ``rate`` a second, each one
    waited for; returns how many the broker acknowledged."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.username_pw_set(SENSOR_USER, SENSOR_PASSWORD)
    c.connect(host, port)
    c.loop_start()
    acked = 0
    started = time.monotonic()
    try:
        for i in range(n):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            info = c.publish(TOPIC, reading_payload(T0 + (first + i) * 1000, t=float(i)), qos=1)
            info.wait_for_publish(timeout=30)
            acked += info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()
    return acked


def connect_as(host: str, port: int, client_id: str, *, clean: bool) -> str:
    """Connect with another device's account and ``client_id`` (MQTT 3.1.1), then
    disconnect; the broker's CONNACK result as text."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.username_pw_set(INTRUDER, INTRUDER_PASSWORD)
    result: dict[str, str] = {}
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        result["rc"] = str(rc)
        done.set()

    c.on_connect = on_connect
    c.connect(host, port)
    c.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
    finally:
        c.disconnect()
        c.loop_stop()
    return result["rc"]


def settled(collector: Collector, quiet: float = 3.0, timeout: float = 60) -> int:
    """The collector's stored readings once nothing new arrived for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = collector.readings(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = collector.readings()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError(f"the store kept changing for {timeout} s")


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Broker]:
    """A broker laid out as the mosquitto role lays it out: the collector's listener (``port``)
    and a device listener (``device_port``) whose client ids are the account names; with a
    second device account, the intruder's."""
    broker = Broker(tmp_path / "broker", device_listener=True)
    subprocess.run(
        [MOSQUITTO_PASSWD, "-b", str(broker.passwd), INTRUDER, INTRUDER_PASSWORD], check=True
    )
    broker.start()
    yield broker
    broker.stop()


def offline_session(config: Path, tmp_path: Path) -> Collector:
    """Start the collector until it holds its subscriptions, then stop it: its persistent
    session stays on the broker and queues what arrives."""
    collector = Collector(config, tmp_path / "collect.log")
    collector.start()
    collector.subscribed()
    assert collector.stop() == 0
    return collector


# -- the collector's session cannot be taken ------------------------------------------------


@pytest.mark.parametrize("clean", [True, False], ids=["clean-session", "persistent"])
def test_device_account_with_the_collectors_id_does_not_touch_its_queue(
    guarded: Broker, config_file: ConfigFactory, tmp_path: Path, clean: bool
) -> None:
    """Issue 15 item 1: with a clean session the queued messages were gone (0/40 stored)."""
    config = config_file(broker=guarded)
    collector = offline_session(config, tmp_path)
    assert publish_paced(guarded.host, guarded.device_port, 40, 1000) == 40
    cid = collector_id(config)
    assert connect_as(guarded.host, guarded.device_port, cid, clean=clean) == "Success"
    # the broker renamed the device's connection after its account
    log = guarded.log.read_text()
    assert f"as {INTRUDER} (" in log
    assert f"as {cid} (p2, c{int(clean)}" not in log

    collector.start()
    wait_until(lambda: collector.readings() == 40, timeout=60, what="40 readings stored")
    assert settled(collector) == 40


def test_the_collectors_listener_is_what_makes_the_difference(
    guarded: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """The control: the same attack on a listener that keeps client ids (the collector's own,
    hence bound to the loopback) empties the queue. This is the hole the device listeners close."""
    config = config_file(broker=guarded)
    collector = offline_session(config, tmp_path)
    assert publish_paced(guarded.host, guarded.device_port, 40, 1000) == 40
    assert connect_as(guarded.host, guarded.port, collector_id(config), clean=True) == "Success"
    collector.start()
    assert settled(collector) == 0


def test_repeated_takeovers_do_not_kick_the_collector(
    guarded: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """Issue 15 item 1: repeated takeovers kicked the collector off (20/60 stored)."""
    config = config_file(broker=guarded)
    cid = collector_id(config)
    collector = Collector(config, tmp_path / "collect.log")
    collector.start()
    collector.subscribed()
    stop = threading.Event()
    attempts = {"n": 0}

    def attack() -> None:
        while not stop.is_set():
            connect_as(guarded.host, guarded.device_port, cid, clean=attempts["n"] % 2 == 0)
            attempts["n"] += 1
            time.sleep(0.05)

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        assert publish_paced(guarded.host, guarded.device_port, 60, 30) == 60
    finally:
        stop.set()
        attacker.join(30)
    assert attempts["n"] >= 10
    wait_until(lambda: collector.readings() == 60, timeout=60, what="60 readings stored")
    assert settled(collector) == 60
    assert collector.alive()
    assert f"Client {cid} already connected" not in guarded.log.read_text()
    collector.stop()


# -- the broker's window of loss --------------------------------------------------------------


@pytest.mark.parametrize(
    ("autosave", "extra", "kept"),
    [
        (DEPLOYED_AUTOSAVE, "", True),
        ("autosave_on_changes true\nautosave_interval 100\n", "plugin_opt_save_ms 0\n", False),
    ],
    ids=["deployed", "mosquitto-every-100-changes"],
)
def test_broker_killed_after_a_quiet_second_loses_nothing(
    tmp_path: Path, config_file: ConfigFactory, autosave: str, extra: str, kept: bool
) -> None:
    """250 readings at 100/s with the collector stopped, a second of quiet, the broker
    SIGKILLed: the deployed settings keep all 250; Mosquitto's own saves every 100 changes
    (the role's earlier setting, the plugin's saves off: the control) lose the readings since
    the last hundredth change (the collector's own session changes count too)."""
    broker = Broker(tmp_path / "broker", autosave=autosave, extra_conf=extra)
    broker.start()
    try:
        config = config_file(broker=broker)
        collector = offline_session(config, tmp_path)
        assert publish_paced(broker.host, broker.port, 250, 100) == 250
        time.sleep(1.0)
        broker.stop(signal.SIGKILL)
        broker.start()
        collector.start()
        stored = settled(collector)
        collector.stop()
        if kept:
            assert stored == 250
        else:
            assert 150 <= stored < 250
    finally:
        broker.stop()


def test_broker_killed_while_readings_arrive_loses_under_a_second(
    tmp_path: Path, config_file: ConfigFactory
) -> None:
    """Readings at 100/s with the collector stopped, the broker SIGKILLed right after an
    acknowledgement, three times: each kill loses at most the last second (100 readings)."""
    broker = Broker(tmp_path / "broker", autosave=DEPLOYED_AUTOSAVE)
    broker.start()
    try:
        config = config_file(broker=broker)
        collector = offline_session(config, tmp_path)
        sent = 0
        for n in (230, 270, 310):
            assert publish_paced(broker.host, broker.port, n, 100, first=sent) == n
            sent += n
            broker.stop(signal.SIGKILL)
            broker.start()
        collector.start()
        stored = settled(collector)
        collector.stop()
    finally:
        broker.stop()
    print(f"acknowledged {sent}, stored {stored}, lost {sent - stored} in 3 kills")
    assert sent - 3 * 100 <= stored <= sent


# -- refusals made visible --------------------------------------------------------------------


def test_denied_publishes_are_counted_and_named_by_status(
    tmp_path: Path, config_file: ConfigFactory
) -> None:
    """Issue 15 item 6: a publish to a topic the account may not use, or with an extra topic
    level, was acknowledged and dropped without a trace on the gateway."""
    acl = tmp_path / "acl"
    acl.write_text(
        f"user {SENSOR_USER}\ntopic write {TOPIC}\n\n"
        f"user {INTRUDER}\ntopic write fieldgate/{INTRUDER}/readings\n\n"
        "user collector\ntopic read fieldgate/+/readings\n"
    )
    refusals = tmp_path / "refusals.json"
    broker = Broker(
        tmp_path / "broker",
        device_listener=True,
        extra_conf=f"acl_file {acl}\nplugin_opt_refusals_file {refusals}\n",
    )
    subprocess.run(
        [MOSQUITTO_PASSWD, "-b", str(broker.passwd), INTRUDER, INTRUDER_PASSWORD], check=True
    )
    broker.start()
    try:
        config = config_file(
            broker=broker, overrides={"mqtt": {"broker_refusals_file": str(refusals)}}
        )
        status = run_fieldgate("status", config=config)
        assert status.returncode == 0, status.stderr
        assert "broker refused  nothing" in status.stdout
        collector = Collector(config, tmp_path / "collect.log")
        collector.start()
        collector.subscribed()
        port = broker.device_port
        publish(broker, [(TOPIC, reading_payload(T0 + i, t=1.0)) for i in range(5)], port=port)
        denied = [("fieldgate/TH-002/readings", reading_payload(T0, t=1.0))] * 3
        publish_denied(
            broker, denied + [(TOPIC + "/extra", reading_payload(T0, t=1.0))] * 2, port=port
        )
        intruder = [(TOPIC, reading_payload(T0 + 99, t=1.0))]
        publish_denied(broker, intruder, username=INTRUDER, password=INTRUDER_PASSWORD, port=port)
        wait_until(lambda: collector.readings() == 5, timeout=30, what="5 readings stored")
        wait_until(
            lambda: refusals.exists() and json.loads(refusals.read_text())["denied"] == 6,
            timeout=30,
            what="6 denials counted",
        )
        assert settled(collector, quiet=1.5) == 5
        collector.stop()

        status = run_fieldgate("status", "--json", config=config)
        assert status.returncode == 0, status.stderr
        got = json.loads(status.stdout)["broker_refusals"]
        assert got["state"] == "counted"
        assert got["denied"] == 6
        assert [(a["account"], a["denied"], a["last_topic"]) for a in got["accounts"]] == [
            (SENSOR_USER, 5, TOPIC + "/extra"),
            (INTRUDER, 1, TOPIC),
        ]
        text = run_fieldgate("status", config=config).stdout
        assert "broker refused  6 publishes denied by its ACL since " in text
        assert f"  {SENSOR_USER}         5 denied, last on '{TOPIC}/extra' at " in text
        assert f"  {INTRUDER}         1 denied, last on '{TOPIC}' at " in text
    finally:
        broker.stop()


def test_status_says_when_the_refusals_file_is_not_the_plugins(
    tmp_path: Path, config_file: ConfigFactory
) -> None:
    bad = tmp_path / "refusals.json"
    bad.write_text('{"denied": "many"}')
    config = config_file(overrides={"mqtt": {"broker_refusals_file": str(bad)}})
    text = run_fieldgate("status", config=config).stdout
    assert f"broker refused  unknown: {bad}: not the plugin's counts" in text


# -- protocol errors made visible -------------------------------------------------------------


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(username: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, keepalive 60) with a user name and password."""
    body = _mqtt_string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
    body += _mqtt_string("raw") + _mqtt_string(username) + _mqtt_string(password)
    return bytes([0x10, len(body)]) + body


def raw_session(
    port: int, *, login: tuple[str, str] | None = None, then: bytes = b"", disconnect: bool = False
) -> bytes:
    """A raw TCP client: optionally log in (and wait for the CONNACK), send ``then``, and
    wait until the broker closes the connection (or send DISCONNECT and close it); the
    CONNACK's bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        connack = b""
        if login is not None:
            s.sendall(connect_packet(*login))
            while len(connack) < 4:
                chunk = s.recv(4 - len(connack))
                assert chunk, "the broker closed the connection before its CONNACK"
                connack += chunk
        if then:
            s.sendall(then)
        if disconnect:
            s.sendall(b"\xe0\x00")
        try:
            while s.recv(4096):  # until the broker closes it
                pass
        except ConnectionResetError:  # closed with garbage of ours unread
            pass
        return connack


CONNACK_OK = b"\x20\x02\x00\x00"


def counts(refusals: Path) -> dict[str, object]:
    """The plugin's file (empty before its first write: it is renamed into place)."""
    return json.loads(refusals.read_text()) if refusals.exists() else {}


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[tuple[Broker, Path]]:
    """The deployed layout with the plugin counting refusals and reading the broker's log."""
    acl = tmp_path / "acl"
    acl.write_text(
        f"user {SENSOR_USER}\ntopic write {TOPIC}\n\n"
        f"user {INTRUDER}\ntopic write fieldgate/{INTRUDER}/readings\n"
    )
    refusals = tmp_path / "refusals.json"
    broker = Broker(tmp_path / "broker", device_listener=True)
    broker.extra_conf = (
        f"acl_file {acl}\nplugin_opt_refusals_file {refusals}\nplugin_opt_broker_log {broker.log}\n"
    )
    subprocess.run(
        [MOSQUITTO_PASSWD, "-b", str(broker.passwd), INTRUDER, INTRUDER_PASSWORD], check=True
    )
    broker.start()
    wait_until(
        lambda: counts(refusals).get("broker_log_state") == "reading",
        timeout=60,
        what="the plugin reading the broker's log",
    )
    yield broker, refusals
    broker.stop()


def test_protocol_errors_are_counted_and_named_by_status(
    logged: tuple[Broker, Path], config_file: ConfigFactory
) -> None:
    """Issue 15: a device that breaks the protocol was disconnected with a line in the
    broker's log only. Each kind below is one dropped connection, named by the account (or,
    before a login, the address); a clean disconnect and a wrong password are not counted."""
    broker, refusals = logged
    port = broker.device_port
    sensor = (SENSOR_USER, SENSOR_PASSWORD)
    config = config_file(broker=broker, overrides={"mqtt": {"broker_refusals_file": str(refusals)}})
    text = run_fieldgate("status", config=config).stdout
    assert "broker dropped  nothing (no connection closed for a protocol error)" in text

    raw_session(port, then=b"\xff\xff\xff\xff\xff garbage")  # before a login
    raw_session(port, then=b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")  # not MQTT at all
    assert raw_session(port, login=sensor, then=b"\xff\x00garbage") == CONNACK_OK
    assert raw_session(port, login=sensor, then=connect_packet(*sensor)) == CONNACK_OK
    # a PUBLISH whose topic length runs past the packet
    assert raw_session(port, login=sensor, then=b"\x30\x02\x00\x09") == CONNACK_OK
    intruder = (INTRUDER, INTRUDER_PASSWORD)
    # a PUBLISH with QoS 3 (both QoS bits set)
    assert raw_session(port, login=intruder, then=b"\x36\x05\x00\x01a\x00\x01") == CONNACK_OK
    # not counted: a clean session, a wrong password
    assert raw_session(port, login=sensor, disconnect=True) == CONNACK_OK
    assert raw_session(port, login=(SENSOR_USER, "wrong")) == b"\x20\x02\x00\x05"

    wait_until(
        lambda: counts(refusals).get("protocol_errors") == 6,
        timeout=60,
        what="6 protocol errors counted",
    )
    log = broker.log.read_text()
    assert log.count("disconnected due to protocol error.") == 4
    assert log.count("disconnected due to malformed packet.") == 2
    assert "Client sensor disconnected." in log
    assert "disconnected, not authorised." in log

    status = run_fieldgate("status", "--json", config=config)
    assert status.returncode == 0, status.stderr
    got = json.loads(status.stdout)["broker_refusals"]
    assert got["denied"] == 0
    p = got["protocol_errors"]
    assert (p["log"], p["state"], p["dropped"], p["other_sources"]) == (
        str(broker.log),
        "reading",
        6,
        0,
    )
    assert [
        (s["source"], s["account"], s["address"], s["errors"], s["last_error"])
        for s in p["sources"]
    ] == [
        (SENSOR_USER, SENSOR_USER, "127.0.0.1", 3, "malformed packet"),
        ("127.0.0.1", "", "127.0.0.1", 2, "protocol error"),
        (INTRUDER, INTRUDER, "127.0.0.1", 1, "malformed packet"),
    ]
    text = run_fieldgate("status", config=config).stdout
    assert "broker refused  nothing (no publish denied by its ACL)" in text
    assert "broker dropped  6 connections for protocol errors since " in text
    # names in a column as wide as the longest, "(no login) 127.0.0.1"
    assert (
        f"  {SENSOR_USER:<20}         3 dropped from 127.0.0.1, last: malformed packet at " in text
    )
    assert "  (no login) 127.0.0.1         2 dropped, last: protocol error at " in text
    assert f"  {INTRUDER:<20}         1 dropped from 127.0.0.1, last: malformed packet at " in text


def test_protocol_errors_are_counted_across_a_log_rotation(logged: tuple[Broker, Path]) -> None:
    """logrotate renames the log, then reloads the broker (Debian's postrotate), which only
    then opens a new file: errors before the reload land in the renamed file, errors after it
    in the new one, and every one is counted once."""
    broker, refusals = logged
    port = broker.device_port
    sensor = (SENSOR_USER, SENSOR_PASSWORD)
    raw_session(port, login=sensor, then=b"\xff\x00")
    wait_until(lambda: counts(refusals).get("protocol_errors") == 1, what="1 counted")
    broker.log.rename(broker.log.with_name("mosquitto.log.1"))
    raw_session(port, login=sensor, then=b"\xff\x00")  # still written to the renamed file
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    wait_until(broker.log.exists, what="the broker reopening its log")
    raw_session(port, login=sensor, then=b"\xff\x00")
    raw_session(port, then=b"\xff\x00")
    wait_until(lambda: counts(refusals).get("protocol_errors") == 4, what="4 counted")
    sources = {s["source"]: s["errors"] for s in counts(refusals)["protocol_error_sources"]}
    assert sources == {SENSOR_USER: 3, "127.0.0.1": 1}
    assert "Client <unknown> disconnected due to protocol error." in broker.log.read_text()


def test_status_says_when_the_plugin_reads_another_log(
    tmp_path: Path, config_file: ConfigFactory
) -> None:
    """The log the plugin is told to read must be the broker's own (its start notice must
    appear in it): a wrong path is reported, not a silent zero."""
    acl = tmp_path / "acl"
    acl.write_text(f"user {SENSOR_USER}\ntopic write {TOPIC}\n")
    refusals, other = tmp_path / "refusals.json", tmp_path / "other.log"
    other.write_text("")
    broker = Broker(
        tmp_path / "broker",
        extra_conf=f"acl_file {acl}\nplugin_opt_refusals_file {refusals}\n"
        f"plugin_opt_broker_log {other}\n",
    )
    broker.start()
    try:
        wait_until(
            lambda: counts(refusals).get("broker_log_state") == "foreign",
            what="the plugin finding the log foreign",
        )
        config = config_file(overrides={"mqtt": {"broker_refusals_file": str(refusals)}})
        text = run_fieldgate("status", config=config).stdout
        assert (
            f"broker dropped  unknown: {other}: the plugin's start notice did not appear in it"
            in text
        )
        assert f"fieldgate_stamp: {other}: the plugin's start notice" in broker.log.read_text()
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("path", "extra"),
    [("relative.log", ""), ('/tmp/a"b.log', ""), ("/tmp/x.log", "no refusals file")],
    ids=["relative", "quote", "without-refusals-file"],
)
def test_the_plugin_refuses_a_broker_log_it_cannot_use(
    tmp_path: Path, path: str, extra: str
) -> None:
    refusals = "" if extra else f"plugin_opt_refusals_file {tmp_path}/refusals.json\n"
    broker = Broker(tmp_path / "broker", extra_conf=f"{refusals}plugin_opt_broker_log {path}\n")
    with pytest.raises(RuntimeError, match="mosquitto did not start"):
        broker.start()
    log = broker.log.read_text()
    if extra:
        assert "plugin_opt_broker_log needs plugin_opt_refusals_file" in log
    else:
        assert (
            "plugin_opt_broker_log must be an absolute path without quotes, backslashes or "
            f"control characters, not '{path}'" in log
        )
