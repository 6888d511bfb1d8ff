"""The store writer's cheap path for device formats (``inputs.device_rows``) stores exactly
what the long path (every message decoded and validated with its reasons) stores: for the
usual, edge, malformed and hostile payloads of every format, in real store files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_hostile_readings import INPUTS, TEMPLATES, TOPICS, hostile_payloads, mutate
from test_writer import AT, T0, long_path, stored

from fieldgate import store
from fieldgate.config import Config, parse_config
from fieldgate.inputs import device_rows, read_message
from fieldgate.readings import Rules
from fieldgate.writer import MessageReader, commit_batch

ISEMS = "isems-7;1;{ts};FF-ESP32-1A;3600;0;20.1;17.3;13.2;95;100;21.5;11.9;14.6;7.2;10;52.5"


def config(tmp_path: Path) -> Config:
    return parse_config(
        {
            "site": {"serial": "GW"},
            "store": {"path": str(tmp_path / "unused.db")},
            "mqtt": {
                "max_payload_bytes": 4 * 1024 * 1024,
                "inputs": [
                    *INPUTS,
                    {
                        "topic": "isems/{device}/csvlog",
                        "format": "csv",
                        "csv": {
                            "delimiter": ";",
                            "columns": ["device", "-", "ts", "-", "tts", "save", "voc"],
                            "ts_unit": "s",
                        },
                    },
                    {"topic": "{device}/sensor/{metric}/state", "format": "value"},
                    {
                        "topic": "berlin/{device}/SENSOR",
                        "format": "tasmota",
                        "timezone": "Europe/Berlin",
                        "exclude": ["*.Id", "ENERGY.*"],
                    },
                    {"topic": "late/{device}", "format": "zigbee2mqtt", "ts_from": "arrival"},
                    {"topic": "one/sensor", "format": "zigbee2mqtt", "device": "TH-002"},
                    {
                        "topic": "picked/{device}",
                        "format": "json",
                        "ts_path": "t",
                        "ts_unit": "s",
                        "include": ["temp*"],
                    },
                ],
            },
            "devices": {
                "list": [
                    {"serial": "TH-001", "alias": "roof"},
                    {"serial": "TH-002"},
                    {"serial": "isems-7"},
                ],
                "allow_unknown": False,
            },
        }
    )


def j(obj: object) -> bytes:
    return json.dumps(obj).encode()


TASMOTA = {
    "Time": "2026-01-01T00:00:01",
    "AM2301": {"Temperature": 21.5, "Humidity": 45},
    "TempUnit": "C",
}

#: (topic, payload): the usual message of each format and the ways one can differ from it.
MESSAGES: list[tuple[str, bytes]] = [
    # tasmota
    ("tele/TH-001/SENSOR", j(TASMOTA)),
    ("tele/TH-001/SENSOR", j(TASMOTA)),  # a repeat: ignored by the store
    ("tele/TH-001/SENSOR", j({**TASMOTA, "AM2301": {"Temperature": 99.0}})),  # other value
    ("tele/roof/SENSOR", j({**TASMOTA, "Time": "2026-01-01T00:00:02"})),  # alias
    ("tele/TH-001/SENSOR", j({"AM2301": {"Temperature": 20}})),  # no Time: the stamp
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:03Z", "POWER": "ON", "x": True})),
    ("tele/TH-001/SENSOR", j({"Time": 1767225604, "A": {"B": {"C": 1}}})),  # epoch seconds
    ("tele/TH-001/SENSOR", j({"Time": "yesterday", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-13-01T00:00:00", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "1970-01-01T00:00:05", "A": 1})),  # too early
    ("tele/TH-001/SENSOR", j({"Time": "2027-01-01T00:00:00", "A": 1})),  # future
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:06", "TempUnit": "C"})),  # no value
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:07", "bad name!": 1, "A": 2})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:08", "A": {"B": 1}, "A.B": 2})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:08", "A": {"B": 1}, "A.B": 1})),
    ("tele/TH-001/SENSOR", b'{"Time": "2026-01-01T00:00:09", "A": 1e999, "B": 2}'),
    ("tele/TH-001/SENSOR", b'{"Time": "2026-01-01T00:00:10", "A": NaN}'),
    ("tele/TH-001/SENSOR", b'  {"Time": "2026-01-01T00:00:11", "A": 1}\n'),
    ("tele/TH-001/SENSOR", b'{"Time": "2026-01-01T00:00:12", "A": 1'),
    ("tele/TH-001/SENSOR", b"[1, 2]"),
    ("tele/TH-001/SENSOR", b"\xff\xfe{}"),
    ("tele/TH-001/SENSOR", b""),
    ("tele/XX-9/SENSOR", j(TASMOTA)),  # unknown device
    ("tele/bad name/SENSOR", j(TASMOTA)),
    ("berlin/TH-001/SENSOR", j({**TASMOTA, "ENERGY": {"Power": 5}, "DS": {"Id": 7, "T": 3}})),
    ("berlin/TH-001/SENSOR", j({"Time": "2026-03-29T02:30:00", "ENERGY": {"Power": 5}})),
    ("berlin/TH-001/SENSOR", j({"Time": "2026-10-25T02:30:00", "DS": {"Id": 7, "T": 3}})),
    ("berlin/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:13", "ENERGY": {"Power": 5}})),
    *(  # the usual message of an input with include/exclude
        ("berlin/TH-001/SENSOR", j({**TASMOTA, "Time": f"2026-01-01T00:00:2{i}", "ENERGY": {}}))
        for i in range(3)
    ),
    # tasmota: the Time's fast path and what it must leave to the slow one
    ("tele/TH-001/SENSOR", j({"Time": " 2026-01-01T00:00:14 ", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:60", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:\u0661\u0665", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01t00:00:16", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:17.5", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:18+01:00", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "1767225619", "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": None, "A": 1})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:20", "X": {"Time": 5}, "Y": "z"})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:21", "A": 10**400, "B": [1]})),
    ("tele/TH-001/SENSOR", j({"Time": "2026-01-01T00:00:22"})),
    # zigbee2mqtt
    ("zigbee2mqtt/TH-001", j({"temperature": 21.5, "humidity": 45.5})),
    ("zigbee2mqtt/TH-001", j({"temperature": 21.5, "humidity": 45.5})),  # a redelivery
    ("zigbee2mqtt/TH-001", j({"state": "ON", "update": {"state": "idle", "x": None}, "q": 9})),
    ("zigbee2mqtt/TH-001", j({"temperature": 20, "last_seen": "2026-01-01T00:00:20+01:00"})),
    ("zigbee2mqtt/TH-001", j({"temperature": 20, "last_seen": T0 + 21})),
    ("zigbee2mqtt/TH-001", j({"temperature": 20, "last_seen": None})),
    ("zigbee2mqtt/TH-001", j({"temperature": 20, "last_seen": True})),
    ("zigbee2mqtt/TH-001", j({"action": "single", "list": [1]})),
    ("zigbee2mqtt/TH-001", j({})),
    ("zigbee2mqtt/TH-001", j({"n": 10**400, "m": 1})),
    ("late/TH-001", j({"temperature": 20, "last_seen": T0 + 22})),  # ts_from: arrival
    ("one/sensor", j({"temperature": 23.5})),  # the input's device
    # shelly
    (
        "shelly/TH-001/events/rpc",
        j({"method": "NotifyStatus", "params": {"ts": 1767225630.25, "switch:0": {"id": 0}}}),
    ),
    (
        "shelly/TH-001/events/rpc",
        j(
            {
                "method": "NotifyFullStatus",
                "params": {"ts": 1767225631.5, "temperature:0": {"id": 0, "tC": 21, "tF": 69.8}},
            }
        ),
    ),
    ("shelly/TH-001/events/rpc", j({"method": "NotifyEvent", "params": {"ts": 1}})),
    ("shelly/TH-001/events/rpc", j({"method": "NotifyStatus", "params": {"x": 1}})),
    (
        "shelly/TH-001/events/rpc",
        j({"method": "NotifyStatus", "params": {"ts": 1767225632, "a": {"b": 1}, "a.b": 2}}),
    ),
    (
        "shelly/TH-001/events/rpc",
        j({"method": "NotifyStatus", "params": {"ts": 5, "sys": 5, "wifi": {"ssid": "x"}}}),
    ),
    ("shelly/TH-001/events/rpc", j({"method": "NotifyStatus", "params": {"ts": "x", "a": 1}})),
    ("shelly/TH-001/events/rpc", j({"method": "NotifyStatus", "params": {"id": 3, "s": "on"}})),
    ("shelly/TH-001/events/rpc", j({"method": "NotifyStatus", "params": []})),
    # influx
    ("telegraf/TH-001", b"weather,loc=roof temperature=21.5,humidity=45i 1767225640000000000"),
    ("telegraf/TH-001", b"weather temperature=21.5\nweather temperature=22 1767225641000000000"),
    ("telegraf/TH-001", b"weather temperature=21.5\nweather temperature=22.5"),  # same stamp
    ("telegraf/TH-001", b"weather temperature=21.5\nweather temperature=21.5"),
    ("telegraf/TH-001", b'# c\n\nw t=1e999,s="x"\nw bad\nw t=1 1767225642000000000'),
    ("telegraf/TH-001", b"w\\ x,a\\,b=c t=1u,f=t 1767225643000000000\r\n"),
    # thingsboard, with the "rssi" metric of a device and arrays
    ("tb/TH-001/telemetry", j({"ts": T0 + 50, "values": {"t": 1, "rssi": -60}})),
    ("tb/TH-001/telemetry", j([{"ts": T0 + 51, "values": {"t": 1}}, {"t": 2}, {"t": 2}])),
    ("tb/TH-001/telemetry", j([{"ts": T0 + 52, "values": {"t": 1}}, {"ts": T0 + 52, "t": 9}])),
    ("tb/TH-001/telemetry", j([{"ts": T0 + 53, "values": 5}, {"t": 2}])),
    ("tb/TH-001/telemetry", j([])),
    # json with include
    ("picked/TH-001", j({"t": 1767225660, "temperature": 20, "humidity": 40})),
    ("picked/TH-001", j({"t": 1767225661, "humidity": 40})),
    ("picked/TH-001", j({"temperature": 20})),
    # value (ESPHome)
    ("value/TH-001/t", b"21.5"),
    ("TH-001/sensor/temperature/state", b"21.5"),
    ("TH-001/sensor/motion/state", b"ON"),
    ("TH-001/sensor/temperature/state", b"nan"),
    ("TH-001/sensor/temperature/state", b"1e999"),
    ("XX-9/sensor/temperature/state", b"21.5"),
    # csv (an ISEMS node's log lines: a device column)
    ("isems/isems-7/csvlog", "\n".join(ISEMS.format(ts=1767225670 + i) for i in range(3)).encode()),
    ("isems/isems-7/csvlog", ISEMS.format(ts=1767225680).replace("isems-7", "TH-001").encode()),
    ("isems/isems-7/csvlog", ISEMS.format(ts=1767225681).replace("isems-7;", ";").encode()),
    ("isems/isems-7/csvlog", ISEMS.format(ts=1767225682).replace("isems-7", "XX-9").encode()),
    ("isems/isems-7/csvlog", b"isems-7;1;x;2\n\n"),
    ("csv/TH-001", b"TH-001,1767225690000,1\nroof,1767225691000,2"),
    # the native format alongside
    ("fieldgate/TH-001/readings", j({"ts": T0 + 99, "metrics": {"t": 1.5}})),
]


def check_same(tmp_path: Path, items: list, passes: int = 2) -> list[tuple]:
    """Commit ``items`` through the writer and the long way into two stores, ``passes``
    times (then every metric name is known and the usual payloads are repeats); both stores
    must hold the same readings, rejections and counters. Returns the stored readings."""
    cfg = config(tmp_path)
    fast = store.open_store(tmp_path / "fast.db", "GW")
    slow = store.open_store(tmp_path / "slow.db", "GW")
    fast_reader = MessageReader(cfg, {})
    slow_reader = MessageReader(cfg, {})
    for _ in range(passes):
        result = commit_batch(fast, fast_reader, items)
        new, bad = long_path(slow, slow_reader, items)
        assert result[0] == "done"
        assert (result[1], result[2], result[3]) == (new, len(bad), bad[:3])
        assert stored(fast) == stored(slow)
    return stored(fast)[0]


def test_device_formats_store_what_the_long_path_stores(tmp_path: Path) -> None:
    # stamped by the broker, except every fifth (the collector's stand-in stamp)
    items = [(t, p, AT, None if i % 5 == 4 else T0 + 500 + i) for i, (t, p) in enumerate(MESSAGES)]
    readings = check_same(tmp_path, items)
    assert ("TH-001", T0 + 1000, "AM2301.Temperature", 21.5, AT, "mqtt") in readings
    one = next(i for i, (t, _) in enumerate(MESSAGES) if t == "one/sensor")
    assert ("TH-002", T0 + 500 + one, "temperature", 23.5, AT, "mqtt") in readings
    assert ("isems-7", T0 + 70_000, "voc", 20.1, AT, "mqtt") in readings


def test_hostile_payloads_of_every_format_store_what_the_long_path_stores(
    tmp_path: Path,
) -> None:
    items = [(t, p, AT, T0 + 500 + i) for i, (t, p) in enumerate(hostile_payloads())]
    check_same(tmp_path, items, passes=1)


def test_mutated_payloads_of_every_format_store_what_the_long_path_stores(
    tmp_path: Path,
) -> None:
    rng = random.Random(16)
    items = []
    for fmt, templates in TEMPLATES.items():
        for template in templates:
            valid = template.replace("{V}", "1").replace('"1"', '"2026-01-01T00:00:00"')
            items.append((TOPICS[fmt], valid.encode(), AT, T0 + len(items)))
            for _ in range(40):
                items.append((TOPICS[fmt], mutate(rng, valid), AT, T0 + len(items)))
    check_same(tmp_path, items)


@pytest.mark.parametrize("topic,payload", MESSAGES)
def test_device_rows_takes_a_message_only_with_the_long_paths_result(
    tmp_path: Path, topic: str, payload: bytes
) -> None:
    reader = MessageReader(config(tmp_path), {})
    rules: Rules = reader.rules
    found = reader.table.match(topic)
    target = reader.fast_target(topic)
    if found is None or found[0].decoder is None or target is None:
        return  # no device input, or a device that does not resolve: the long way
    inp, device, metric = found
    stamp = T0 + 7
    outcome = read_message(inp, device, metric, payload, rules, stamp=stamp, now_ms=AT)
    into: list[object] = ["before"]
    took = device_rows(
        inp, target[1], metric, payload, rules, stamp=stamp, at=AT, source="mqtt", into=into
    )
    if took is not None:
        assert outcome.reason is None
        assert took == outcome.skipped
        rows = [(d, ts, m, v, AT, "mqtt") for d, ts, m, v in outcome.readings]
        assert into[1:] == [x for row in rows for x in row]
    else:
        assert into == ["before"]


@pytest.mark.parametrize(
    "topic,payload",
    [
        ("tele/TH-001/SENSOR", j(TASMOTA)),
        ("zigbee2mqtt/TH-001", j({"temperature": 21.5, "humidity": 45.5, "x": None})),
        ("shelly/TH-001/events/rpc", j({"method": "NotifyStatus", "params": {"a:0": {"t": 1}}})),
        ("telegraf/TH-001", b"weather,loc=roof temperature=21.5,humidity=45i 1767225640000000000"),
        ("tb/TH-001/telemetry", j({"ts": T0 + 50, "values": {"t": 1, "rssi": -60}})),
        ("TH-001/sensor/temperature/state", b"21.5"),
        ("isems/isems-7/csvlog", ISEMS.format(ts=1767225670).encode()),
        ("picked/TH-001", j({"t": 1767225660, "temperature": 20, "humidity": 40})),
    ],
)
def test_device_rows_takes_the_usual_message_of_every_format(
    tmp_path: Path, topic: str, payload: bytes
) -> None:
    reader = MessageReader(config(tmp_path), {})
    target = reader.fast_target(topic)
    assert target is not None
    key, serial, inp, metric = target
    reader.read(topic, payload, AT, T0)  # the long way first: it learns the metric names
    into: list[object] = []
    took = device_rows(
        inp, serial, metric, payload, reader.rules, stamp=T0, at=AT, source="mqtt", into=into
    )
    assert took is not None and into and len(into) % 6 == 0
    assert key == inp.key and serial == into[0]
