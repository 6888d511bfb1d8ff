"""Devices as they are (issue 16, docs/inputs.md) through a real Mosquitto that loads the
arrival-stamp plugin, into a real store, with the real ``fieldgate collect`` process."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from support import (
    SENSOR_PASSWORD,
    SENSOR_USER,
    Broker,
    Collector,
    ConfigFactory,
    count_rows,
    publish,
    query,
    reading_payload,
    run_fieldgate,
    state,
    v311_session,
    wait_until,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z

DEVICES = [
    {"serial": "TH-001"},
    {"serial": "SONOFF-TH16", "alias": "th16"},
    {"serial": "0x00158d0001b79111"},
    {"serial": "shellyplusht-b8d61a8b17cc"},
    {"serial": "livingroom"},
    {"serial": "isems-7"},
    {"serial": "telegraf-1", "alias": "roof"},
    {"serial": "tb-dev-1"},
    {"serial": "boiler"},
]

ISEMS_COLUMNS = [
    "device", "-", "ts", "-", "time_to_shutdown", "power_save", "open_circuit_voltage",
    "mpp_voltage", "battery_voltage", "charge_state", "health", "battery_temperature",
]  # fmt: skip

INPUTS: list[dict[str, Any]] = [
    {"topic": "tele/{device}/SENSOR", "format": "tasmota", "timezone": "Europe/Berlin"},
    {"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt", "exclude": ["linkquality"]},
    {"topic": "{device}/events/rpc", "format": "shelly"},
    {"topic": "{device}/sensor/{metric}/state", "format": "value"},
    {"topic": "{device}/binary_sensor/{metric}/state", "format": "value"},
    {
        "topic": "isems/{device}/csvlog",
        "format": "csv",
        "csv": {"delimiter": ";", "columns": ISEMS_COLUMNS, "ts_unit": "s"},
    },
    {"topic": "telegraf/{device}", "format": "influx"},
    {"topic": "v1/devices/me/telemetry", "format": "thingsboard", "device": "tb-dev-1"},
    {
        "topic": "site/boiler/status",
        "format": "json",
        "device": "boiler",
        "ts_path": "time",
        "metrics_path": "data",
        "ts_unit": "s",
    },
]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def isems_line(ts_s: int, voc: float) -> str:
    return f"isems-7;1;{ts_s};FF-ESP32-1A;3600;0;{voc};17.3;13.2;95;100;21.5;11.9;14.6;7.2;10;0C0"


@pytest.fixture
def gateway(mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path) -> Iterator[Collector]:
    config = config_file(
        broker=mosquitto,
        overrides={"mqtt": {"inputs": INPUTS}, "devices": {"list": DEVICES}},
    )
    c = Collector(config, tmp_path / "collector.log")
    c.start()
    c.subscribed()
    yield c
    if c.alive():
        assert c.stop() == 0


def rows(c: Collector, device: str) -> list[tuple[int, str, float]]:
    return query(
        c.db, "SELECT ts, metric, value FROM readings WHERE device = ? ORDER BY id", (device,)
    )


def test_each_format_on_its_real_topic_arrives_as_the_right_rows(
    mosquitto: Broker, gateway: Collector
) -> None:
    shelly = {
        "src": "shellyplusht-b8d61a8b17cc",
        "dst": "shellyplusht-b8d61a8b17cc/events",
        "method": "NotifyFullStatus",
        "params": {
            "ts": 1767225600.25,
            "humidity:0": {"id": 0, "rh": 42.2},
            "temperature:0": {"id": 0, "tC": 19.8, "tF": 67.6},
            "sys": {"mac": "B8D61A8B17CC", "uptime": 3},
        },
    }
    before = now_ms()
    publish(
        mosquitto,
        [
            (
                "tele/th16/SENSOR",
                '{"Time":"2026-01-01T01:00:00","DS18B20-1":{"Id":"00000566CC39",'
                '"Temperature":21.5},"AM2301":{"Temperature":20.1,"Humidity":58.2},'
                '"TempUnit":"C"}',
            ),
            (
                "zigbee2mqtt/0x00158d0001b79111",
                '{"battery":100,"identify":null,"linkquality":216,"temperature":27.34,'
                '"update":{"installed_version":33816598,"latest_version":33816598,'
                '"state":"idle"}}',
            ),
            ("shellyplusht-b8d61a8b17cc/events/rpc", json.dumps(shelly)),
            ("livingroom/sensor/temperature/state", "21.5"),
            ("livingroom/binary_sensor/window/state", "ON"),
            (
                "isems/isems-7/csvlog",
                isems_line(1767225600, 20.1) + "\n" + isems_line(1767225660, 20.3),
            ),
            (
                "telegraf/roof",
                "weather,location=us\\ midwest temperature=82,humidity=71i,rain=t,"
                'note="calm" 1767225600000000000',
            ),
            ("v1/devices/me/telemetry", '{"ts":1767225600512,"values":{"temperature":42}}'),
            ("site/boiler/status", '{"time":1767225600,"data":{"flow":{"t":55.5},"pump":true}}'),
            ("fieldgate/TH-001/readings", reading_payload(T0, temperature=1.5)),
        ],
    )
    after = now_ms()
    wait_until(lambda: gateway.readings() == 36, what="36 readings")
    assert count_rows(gateway.db, "rejected") == 0
    assert rows(gateway, "SONOFF-TH16") == [
        (T0, "DS18B20-1.Temperature", 21.5),  # 01:00 in Berlin is 00:00 UTC
        (T0, "AM2301.Temperature", 20.1),
        (T0, "AM2301.Humidity", 58.2),
    ]
    z2m = rows(gateway, "0x00158d0001b79111")
    assert [(m, v) for _, m, v in z2m] == [
        ("battery", 100.0),
        ("temperature", 27.34),
        ("update.installed_version", 33816598.0),
        ("update.latest_version", 33816598.0),
    ]
    stamp = z2m[0][0]
    assert before <= stamp <= after  # the broker's arrival stamp
    assert {ts for ts, _, _ in z2m} == {stamp}
    assert rows(gateway, "shellyplusht-b8d61a8b17cc") == [
        (T0 + 250, "humidity:0.rh", 42.2),
        (T0 + 250, "temperature:0.tC", 19.8),
        (T0 + 250, "temperature:0.tF", 67.6),
        (T0 + 250, "sys.uptime", 3.0),
    ]
    living = rows(gateway, "livingroom")
    assert [(m, v) for _, m, v in living] == [("temperature", 21.5), ("window", 1.0)]
    assert all(before <= ts <= after for ts, _, _ in living)
    isems = rows(gateway, "isems-7")
    assert len(isems) == 16  # 8 metric columns, 2 lines
    assert isems[:3] == [
        (T0, "time_to_shutdown", 3600.0),
        (T0, "power_save", 0.0),
        (T0, "open_circuit_voltage", 20.1),
    ]
    assert (T0 + 60000, "open_circuit_voltage", 20.3) in isems
    assert rows(gateway, "telegraf-1") == [
        (T0, "weather.temperature", 82.0),
        (T0, "weather.humidity", 71.0),
        (T0, "weather.rain", 1.0),
    ]
    assert rows(gateway, "tb-dev-1") == [(T0 + 512, "temperature", 42.0)]
    assert rows(gateway, "boiler") == [(T0, "flow.t", 55.5), (T0, "pump", 1.0)]
    assert rows(gateway, "TH-001") == [(T0, "temperature", 1.5)]

    r = run_fieldgate("status", "--json", config=gateway.config)
    assert r.returncode == 0, r.stderr
    by_topic = {i["topic"]: i for i in json.loads(r.stdout)["inputs"]}
    assert by_topic["zigbee2mqtt/{device}"] == {
        "topic": "zigbee2mqtt/{device}",
        "format": "zigbee2mqtt",
        "messages": 1,
        "readings": 4,
        "skipped": 2,  # identify: null, update.state (linkquality is excluded, not skipped)
        "rejected": 0,
        "unstamped": 0,
    }
    assert by_topic["tele/{device}/SENSOR"]["skipped"] == 2  # Id, TempUnit
    assert by_topic["fieldgate/{device}/readings"]["readings"] == 1
    text = run_fieldgate("status", config=gateway.config).stdout
    assert "inputs\n" in text
    assert "zigbee2mqtt/{device}" in text and "1 messages, 4 readings, 2 skipped values" in text
    assert "arrival stamps" not in text


#: (topic, payload, what the reason says): one malformed message per format, or more.
MALFORMED: list[tuple[str, str | bytes, str]] = [
    ("tele/th16/SENSOR", "{not json", "bad JSON"),
    ("tele/th16/SENSOR", '["a"]', "expected a Tasmota JSON object, got an array"),
    ("tele/th16/SENSOR", '{"Time":"2026-13-01T00:00:00","A":{"T":1}}', "Time: "),
    ("tele/nobody/SENSOR", '{"A":{"T":1}}', "unknown device 'nobody'"),
    ("zigbee2mqtt/0x00158d0001b79111", '{"action":"single"}', "no reading: 1 values"),
    ("zigbee2mqtt/0x00158d0001b79111", b"\xff\xfe", "not valid UTF-8"),
    ("zigbee2mqtt/0x00158d0001b79111", '{"t": NaN}', "NaN is not allowed"),
    (
        "shellyplusht-b8d61a8b17cc/events/rpc",
        '{"method":"NotifyEvent","params":{"ts":1767225600,"events":[]}}',
        'method "NotifyEvent" is not a status notification',
    ),
    ("shellyplusht-b8d61a8b17cc/events/rpc", '{"method":"NotifyStatus"}', "params: expected"),
    ("livingroom/sensor/temperature/state", "nan", "no reading: 1 values are not numbers"),
    ("livingroom/sensor/temperature/state", "", "no reading"),
    ("isems/isems-7/csvlog", "isems-7;1;1767225600;x", "4 fields, expected 12"),
    ("isems/isems-7/csvlog", "isems-7;1;;x;1;2;3;4;5;6;7;8", "ts: empty field"),
    ("isems/isems-7/csvlog", isems_line(1767225, 1.0), "is before devices.min_ts_secs"),
    ("telegraf/roof", "weather temperature=hot 1767225600000000000", "is not a line protocol"),
    ("telegraf/roof", "weather", "no field set"),
    ("v1/devices/me/telemetry", '{"ts":1767225600512,"values":5}', "values: expected an object"),
    ("v1/devices/me/telemetry", "[]", "empty JSON array"),
    ("site/boiler/status", '{"data":{"t":1}}', "time (ts_path): missing"),
    ("site/boiler/status", '{"time":"later","data":{"t":1}}', "is not a date-time"),
    ("tele/th16/SENSOR", "x" * 300_000, "over mqtt.max_payload_bytes"),
]


def test_malformed_corpus_of_every_format_is_rejected_and_collecting_goes_on(
    mosquitto: Broker, gateway: Collector
) -> None:
    messages: list[tuple[str, bytes | str]] = []
    for i, (topic, payload, _) in enumerate(MALFORMED):
        messages.append(("livingroom/sensor/counter/state", str(i)))  # a good neighbour
        messages.append((topic, payload))
    publish(mosquitto, messages)
    wait_until(
        lambda: (
            count_rows(gateway.db, "rejected") == len(MALFORMED)
            and gateway.readings() == len(MALFORMED)
        ),
        what="every message processed",
    )
    assert gateway.alive()
    got = query(gateway.db, "SELECT topic, payload, reason FROM rejected ORDER BY id")
    for (topic, payload, expected), (r_topic, r_payload, reason) in zip(
        MALFORMED, got, strict=True
    ):
        assert r_topic == topic
        assert expected in reason, (topic, payload, reason)
        raw = r_payload.encode() if isinstance(r_payload, str) else r_payload
        sent = payload.encode() if isinstance(payload, str) else payload
        assert raw == sent[:4096]
    publish(mosquitto, [("livingroom/sensor/counter/state", "99")])
    wait_until(lambda: gateway.readings() == len(MALFORMED) + 1, what="collecting goes on")
    status = json.loads(run_fieldgate("status", "--json", config=gateway.config).stdout)
    rejected = {i["topic"]: i["rejected"] for i in status["inputs"]}
    assert rejected["tele/{device}/SENSOR"] == 5
    assert rejected["telegraf/{device}"] == 2


def test_a_stamped_backlog_survives_stop_and_sigkill_mid_drain_exactly_once_in_order(
    mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """The proof of issue 16: readings without a time of their own, published while the
    collector is stopped, keep the time they reached the broker (within 1 s of their
    publication, not the drain's), in order, one reading per message (also two messages of
    one device in one millisecond), and exactly once although the collector is killed
    after committing batches it never acknowledged (the broker redelivers them, DUP, with
    the same fg-ts)."""
    config = config_file(
        broker=mosquitto,
        overrides={
            "mqtt": {
                "inputs": [{"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"}],
                "commit_max_messages": 40,
            },
            "devices": {"list": [{"serial": f"Z-{d}"} for d in range(3)]},
        },
    )
    c = Collector(config, tmp_path / "collector.log")
    c.start()
    c.subscribed()
    assert c.stop() == 0  # the session stays on the broker and queues

    # (device, seq, before publishing, after the broker's PUBACK), epoch ms
    published: list[tuple[int, int, int, int]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="z2m-bridge")
    client.username_pw_set(SENSOR_USER, SENSOR_PASSWORD)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    seq = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for device in range(3):
            sent = []
            for _twice in range(2):  # two messages of a device back to back
                sent.append(
                    (
                        seq,
                        now_ms(),
                        client.publish(f"zigbee2mqtt/Z-{device}", json.dumps({"seq": seq}), qos=1),
                    )
                )
                seq += 1
            for s, t0, info in sent:
                info.wait_for_publish(timeout=60)
                assert info.is_published()
                published.append((device, s, t0, now_ms()))
    client.disconnect()
    client.loop_stop()
    n = len(published)
    time.sleep(2)  # the backlog waits: a drain-time stamp would be > 1 s late

    # restart, and kill the collector mid-drain after its writer committed batches it
    # never acknowledged: stop the collector, let the writer finish, kill
    c.start(wait_running=False)
    killed_between_commit_and_ack = False
    wait_until(lambda: c.readings() > 0, timeout=30, interval=0.002, what="a first commit")
    for _attempt in range(50):
        if c.readings() >= n:
            break
        assert c.proc is not None
        os.kill(c.proc.pid, signal.SIGSTOP)
        at_stop = c.readings()
        time.sleep(0.5)  # the writer commits what it was handed; nothing is acknowledged
        if c.readings() > at_stop:
            killed_between_commit_and_ack = True
            c.stop(signal.SIGKILL)
            break
        os.kill(c.proc.pid, signal.SIGCONT)
        time.sleep(0.003)
    assert killed_between_commit_and_ack, "the drain ended before a kill could land in it"
    assert 0 < c.readings() < n
    c.start()
    wait_until(lambda: c.readings() >= n, timeout=60, what=f"{n} readings")
    time.sleep(0.5)  # nothing more comes
    assert c.stop() == 0

    got = query(c.db, "SELECT device, ts, value FROM readings WHERE metric = 'seq' ORDER BY id")
    assert len(got) == n  # exactly once: one row per message
    by_seq = {int(v): (d, ts) for d, ts, v in got}
    assert sorted(by_seq) == list(range(n))
    # the broker's arrival: after the publish call, by its PUBACK (+1 ms for a second
    # message of the topic in the same millisecond); the drain came seconds later
    off = [
        (s, t0, by_seq[s][1], t1) for _, s, t0, t1 in published if not t0 <= by_seq[s][1] <= t1 + 1
    ]
    assert not off, f"stamps outside publish..PUBACK: {off[:5]}"
    assert all(by_seq[s][1] - t0 < 1000 for _, s, t0, _ in published)
    for device in range(3):
        mine = sorted((by_seq[s][1], s) for d, s, _, _ in published if d == device)
        assert [s for _, s in mine] == sorted(s for _, s in mine), "out of order"
        assert len({ts for ts, _ in mine}) == len(mine)  # one time per message
        assert {by_seq[s][0] for _, s in mine} == {f"Z-{device}"}
    counts = json.loads(run_fieldgate("status", "--json", config=config).stdout)["inputs"][1]
    assert counts["readings"] == n
    assert counts["messages"] > n  # committed deliveries: the redelivered ones counted again
    assert counts["unstamped"] == 0
    assert count_rows(c.db, "rejected") == 0


def test_without_the_broker_plugin_readings_take_the_receive_time_said_once(
    tmp_path: Path, config_file: ConfigFactory
) -> None:
    """An operator's own broker, or a gateway not yet converged with the plugin: nothing
    breaks; the collector's receive time stands in, counted and shown, and the fix is
    named once in the log."""
    broker = Broker(tmp_path / "plain", stamp=False)
    broker.start()
    try:
        config = config_file(
            broker=broker,
            overrides={
                "mqtt": {"inputs": [{"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"}]},
                "devices": {"list": [{"serial": "Z-1"}]},
            },
        )
        c = Collector(config, tmp_path / "collector.log")
        c.start()
        c.subscribed()
        before = now_ms()
        # the same millisecond or not: two messages stay two readings
        publish(broker, [("zigbee2mqtt/Z-1", '{"t": 1}'), ("zigbee2mqtt/Z-1", '{"t": 2}')] * 5)
        wait_until(lambda: c.readings() == 10, what="10 readings")
        publish(broker, [("fieldgate/Z-1/readings", reading_payload(T0, x=1))])
        wait_until(lambda: c.readings() == 11, what="the native reading")
        assert c.stop() == 0
        got = query(c.db, "SELECT ts, value FROM readings WHERE metric = 't' ORDER BY id")
        assert [v for _, v in got] == [1.0, 2.0] * 5
        assert all(before <= ts <= now_ms() for ts, _ in got)
        log = c.log.read_text()
        assert log.count("messages arrive without the broker's arrival stamp (fg-ts)") == 1
        assert "fieldgate broker-conf" in log
        status = json.loads(run_fieldgate("status", "--json", config=config).stdout)
        assert status["inputs"][1]["unstamped"] == 10
        assert status["inputs"][0]["unstamped"] == 0  # native readings carry their own ts
        text = run_fieldgate("status", config=config).stdout
        assert "10 unstamped" in text
        assert "arrival stamps  missing on 10 messages" in text
    finally:
        broker.stop()


def test_the_collector_takes_over_its_mqtt_311_session_and_backlog(
    mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """A gateway upgraded from the MQTT 3.1.1 collector: the backlog its old session queued
    is drained by the v5 collector (same client id), nothing lost."""
    config = config_file(broker=mosquitto)
    client_id = yaml.safe_load(config.read_text())["mqtt"]["client_id"]
    v311_session(mosquitto, client_id, "fieldgate/+/readings")
    publish(
        mosquitto, [("fieldgate/TH-001/readings", reading_payload(T0 + i, t=i)) for i in range(50)]
    )
    c = Collector(config, tmp_path / "collector.log")
    c.start()
    wait_until(lambda: c.readings() == 50, what="the 3.1.1 session's backlog")
    assert c.stop() == 0
    assert "(resumed session)" in c.log.read_text()


def test_an_input_removed_from_the_configuration_is_unsubscribed(
    mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    inputs = [{"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"}]
    config = config_file(broker=mosquitto, overrides={"mqtt": {"inputs": inputs}})
    c = Collector(config, tmp_path / "collector.log")
    c.start()
    c.subscribed()
    assert state(c.db, "collector.subscriptions") == "fieldgate/+/readings\nzigbee2mqtt/+"
    assert c.stop() == 0
    config = config_file(broker=mosquitto, overrides={"mqtt": {"inputs": []}})
    c.config = config
    c.start()
    wait_until(
        lambda: state(c.db, "collector.subscriptions") == "fieldgate/+/readings",
        what="the new subscriptions",
    )
    publish(mosquitto, [("zigbee2mqtt/TH-001", '{"t": 1}')])
    publish(mosquitto, [("fieldgate/TH-001/readings", reading_payload(T0, t=1))])
    wait_until(lambda: c.readings() == 1, what="the native reading")
    time.sleep(0.3)
    assert c.stop() == 0
    assert count_rows(c.db, "rejected") == 0  # the old input's message never came
    assert "unsubscribed from zigbee2mqtt/+ (no longer configured)" in c.log.read_text()


def test_a_retained_state_is_read_once_not_at_every_restart(
    mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """ESPHome retains its states: a new subscription gets them (with the stamp of their
    arrival), a restarted collector re-subscribing its session does not get them again."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.username_pw_set(SENSOR_USER, SENSOR_PASSWORD)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    before = now_ms()
    info = client.publish("livingroom/sensor/temperature/state", "21.5", qos=1, retain=True)
    info.wait_for_publish(timeout=30)
    after = now_ms()
    client.disconnect()
    client.loop_stop()
    config = config_file(
        broker=mosquitto,
        overrides={
            "mqtt": {"inputs": [{"topic": "{device}/sensor/{metric}/state", "format": "value"}]},
            "devices": {"list": [{"serial": "livingroom"}]},
        },
    )
    time.sleep(1.2)  # the collector connects later than the state arrived
    c = Collector(config, tmp_path / "collector.log")
    for _run in range(2):
        c.start()
        c.subscribed()
        publish(mosquitto, [("fieldgate/livingroom/readings", reading_payload(T0 + _run, x=1))])
        wait_until(lambda r=_run: c.readings() == 2 + r, what="the marker reading")
        assert c.stop() == 0
    (ts,) = query(c.db, "SELECT ts FROM readings WHERE metric = 'temperature'")[0]
    assert before <= ts <= after  # its arrival, not the collector's subscription
    status = json.loads(run_fieldgate("status", "--json", config=config).stdout)
    assert status["inputs"][1]["messages"] == 1
