"""Hostile readings: every payload a device can send ends as stored readings or as a rejection
with a reason, for every format, never as an exception ("internal error while validating").

The hostile values (integers past Python's 4300-digit conversion limit, exponents past the
float range, NaN/Infinity spelled every way, deep nesting, invalid UTF-8, lone surrogates,
NUL, very long names and strings) are put into every slot of a valid payload of each
format, and then a seeded random mutation of valid payloads adds what a list would miss.
The outcomes are stored in a real store with the collector's own code.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from support import (
    Broker,
    Collector,
    ConfigFactory,
    count_rows,
    publish,
    query,
    reading_payload,
    wait_until,
)

from fieldgate import store
from fieldgate.config import parse_config
from fieldgate.formats.common import load_json
from fieldgate.inputs import InputTable, read_message
from fieldgate.readings import Outcome, Received, Rules, SampleError, parse_ts, store_outcomes

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NOW = T0 + 3_600_000
BIG = "1" + "0" * 4999  # 5000 digits: past int('...')'s limit of 4300

NATIVE_BIG = b'{"ts": 1767225600000, "metrics": {"t": %s}}' % BIG.encode()

#: Hostile tokens, as they would appear in a text payload (JSON numbers, strings, fields).
TOKENS = [
    BIG,
    "-" + BIG,
    BIG + ".5",
    "0." + "0" * 5000 + "1",
    BIG + "e5",
    "1e99999",
    "-1e99999",
    "1e-99999",
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "nan",
    "inf",
    "-inf",
    '"NaN"',
    '"inf"',
    '"1e999"',
    f'"{BIG}"',
    '"\\ud800"',
    '"\\u0000"',
    '"' + "x" * 300_000 + '"',
    "[" * 50_000 + "]" * 50_000,
    '{"a":' * 20_000 + "1" + "}" * 20_000,
    "true",
    "null",
    "[]",
    "{}",
    '""',
    "-0",
    "1" * 19,
    "9" * 400,
    "18446744073709551616",
    "-9223372036854775809",
    "٣",  # an Arabic-Indic digit: int() takes it, JSON does not
    "1_000",
    "0x10",
    "\x00",
]

#: A valid payload per format, "{V}" marking every slot a hostile token goes into.
TEMPLATES: dict[str, list[str]] = {
    "fieldgate": [
        '{"ts": {V}, "metrics": {"t": 1}}',
        '{"ts": 1767225600000, "metrics": {"t": {V}}}',
        '[{"ts": 1767225600000, "metrics": {"t": 1}}, {"ts": {V}, "metrics": {{V}: 2}}]',
        '{"ts": "2026-01-01T00:00:{V}Z", "metrics": {"t": 1}}',
    ],
    "csv": ["TH-001,{V},{V}", "TH-001,1767225600000,{V}", "{V},1767225600000,1"],
    "value": ["{V}"],
    "json": ['{"data": {"time": {V}, "values": {"t": {V}, "h": 2}}}'],
    "tasmota": [
        '{"Time": "{V}", "AM2301": {"Temperature": {V}}}',
        '{"Time": "2026-01-01T00:00:00", "AM2301": {V}}',
    ],
    "zigbee2mqtt": ['{"temperature": {V}, "last_seen": {V}}', '{"last_seen": "{V}", "t": 1}'],
    "shelly": [
        '{"method": "NotifyStatus", "params": {"ts": {V}, "temperature:0": {"tC": {V}}}}',
        '{"method": "NotifyFullStatus", "params": {"ts": 1767225600.5, "x": {V}}}',
    ],
    "influx": [
        "m,host=a f={V} {V}",
        "m f={V}i 1767225600000000000",
        "m f=1,g={V}u",
        'm s="{V}",f=1',
        "{V} f=1",
    ],
    "thingsboard": ['{"ts": {V}, "values": {"t": {V}}}', '[{"ts": 1767225600000, "values": {V}}]'],
}

INPUTS = [
    {"topic": "csv/{device}", "format": "csv", "csv": {"columns": ["device", "ts", "t"]}},
    {"topic": "value/{device}/{metric}", "format": "value"},
    {
        "topic": "json/{device}",
        "format": "json",
        "ts_path": "data.time",
        "metrics_path": "data.values",
        "ts_unit": "ms",
    },
    {"topic": "tele/{device}/SENSOR", "format": "tasmota"},
    {"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"},
    {"topic": "shelly/{device}/events/rpc", "format": "shelly"},
    {"topic": "telegraf/{device}", "format": "influx", "influx_precision": "ns"},
    {"topic": "tb/{device}/telemetry", "format": "thingsboard"},
]

TOPICS = {
    "fieldgate": "fieldgate/TH-001/readings",
    "csv": "csv/TH-001",
    "value": "value/TH-001/t",
    "json": "json/TH-001",
    "tasmota": "tele/TH-001/SENSOR",
    "zigbee2mqtt": "zigbee2mqtt/TH-001",
    "shelly": "shelly/TH-001/events/rpc",
    "influx": "telegraf/TH-001",
    "thingsboard": "tb/TH-001/telemetry",
}


@pytest.fixture(scope="module")
def table() -> tuple[InputTable, Rules]:
    cfg = parse_config(
        {
            "site": {"serial": "GW"},
            "devices": {"list": [{"serial": "TH-001"}], "allow_unknown": True},
            "mqtt": {"inputs": INPUTS, "max_payload_bytes": 4 * 1024 * 1024},
        },
        "gw.yaml",
    )
    return InputTable(cfg), Rules.from_config(cfg)


def read(table: tuple[InputTable, Rules], topic: str, payload: bytes) -> Outcome:
    inputs, rules = table
    found = inputs.match(topic)
    assert found is not None, topic
    inp, device, metric = found
    outcome = read_message(inp, device, metric, payload, rules, stamp=NOW, now_ms=NOW)
    assert outcome.readings or outcome.reason, (topic, payload[:200])
    if outcome.reason is not None:
        assert "internal error" not in outcome.reason
        assert "\n" not in outcome.reason
        assert len(outcome.reason) < 2000, outcome.reason[:300]
    return outcome


def hostile_payloads() -> list[tuple[str, bytes]]:
    cases = []
    for fmt, templates in TEMPLATES.items():
        for template in templates:
            for token in TOKENS:
                cases.append((TOPICS[fmt], template.replace("{V}", token).encode()))
        cases.append((TOPICS[fmt], b"\xff\xfe" + templates[0].encode()))  # invalid UTF-8
        cases.append((TOPICS[fmt], templates[0].replace("{V}", "1").encode() + b"\xc3"))
        cases.append((TOPICS[fmt], b""))
    return cases


def test_every_hostile_value_in_every_format_is_stored_or_rejected_with_a_reason(
    table: tuple[InputTable, Rules], tmp_path: Path
) -> None:
    cases = hostile_payloads()
    outcomes = [(topic, payload, read(table, topic, payload)) for topic, payload in cases]
    rejected = [o for _, _, o in outcomes if o.reason is not None]
    templates = sum(len(t) for t in TEMPLATES.values())
    assert len(outcomes) == templates * len(TOKENS) + 3 * len(TEMPLATES) == 863
    assert 700 < len(rejected) < len(outcomes)
    # the 5000-digit number of the issue, in the native format: a reason, no exception
    (big,) = [o for t, p, o in outcomes if p == NATIVE_BIG]
    assert big.reason == "bad JSON: an integer of more than 4300 digits"
    assert big.readings == []
    conn = store.open_store(tmp_path / "s.db", "GW")
    try:
        conn.execute("BEGIN IMMEDIATE")
        received = [Received(t, p, NOW, o) for t, p, o in outcomes]
        new = store_outcomes(conn, received, source="mqtt")
        conn.execute("COMMIT")
        assert store.get_meta(conn, "site_serial") == "GW"
        stored_rejections = conn.execute("SELECT COUNT(*) FROM rejected").fetchone()[0]
        readings = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
    finally:
        conn.close()
    assert stored_rejections == len(rejected)
    assert readings == new


def mutate(rng: random.Random, text: str) -> bytes:
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[min(at, len(data) - 1)]
        elif op == 1:
            data[at:at] = rng.choice(TOKENS[:20]).encode()
        elif op == 2 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        else:
            data[at:at] = rng.choice([b"{", b"}", b"[", b"]", b",", b'"', b":", b"\\", b"e9"])
    return bytes(data)


def test_random_mutations_of_valid_payloads_never_raise(
    table: tuple[InputTable, Rules],
) -> None:
    rng = random.Random(15)
    n = 0
    for fmt, templates in TEMPLATES.items():
        for template in templates:
            valid = template.replace("{V}", "1").replace('"1"', '"2026-01-01T00:00:00"')
            for _ in range(300):
                read(table, TOPICS[fmt], mutate(rng, valid))
                n += 1
    assert n == 300 * sum(len(t) for t in TEMPLATES.values())


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (BIG, "bad JSON: an integer of more than 4300 digits"),
        ("[" * 100_000, "bad JSON: nested too deeply"),
        ("NaN", "bad JSON: NaN is not allowed in JSON"),
    ],
)
def test_load_json_names_the_cause(text: str, reason: str) -> None:
    with pytest.raises(SampleError) as err:
        load_json(text)
    assert str(err.value).startswith(reason), str(err.value)


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("value/TH-001/t", "1" * 200_000 + "x"),
        ("csv/TH-001", "TH-001,1767225600000," + "1" * 200_000 + "x"),
        ("telegraf/TH-001", "m f=" + "1" * 200_000 + "x"),
        ("tele/TH-001/SENSOR", '{"Time": "' + "1" * 200_000 + 'x", "A": {"T": 1}}'),
    ],
)
def test_a_long_almost_number_is_refused_in_linear_time(
    table: tuple[InputTable, Rules], topic: str, payload: str
) -> None:
    """A number pattern that backtracks made each such field cost O(n²): seconds at 5000
    digits, hours at 200,000 (this test would not finish)."""
    outcome = read(table, topic, payload.encode())
    assert outcome.readings == [] and outcome.reason is not None


def test_a_store_row_keeps_any_hostile_text(tmp_path: Path) -> None:
    """Lone surrogates and NUL in a reason or topic are kept (SQLite takes them as text)."""
    conn = store.open_store(tmp_path / "s.db", "GW")
    try:
        payload = b'{"ts": 1, "metrics": {"\\ud800\\u0000": 1}}'
        conn.execute("BEGIN")
        outcome = Outcome(device=None, reason="x")
        store_outcomes(conn, [Received("t\x00", payload, NOW, outcome)], source="mqtt")
        conn.execute("COMMIT")
        rows: list[Any] = conn.execute("SELECT topic, payload FROM rejected").fetchall()
    except sqlite3.Error as exc:
        pytest.fail(f"the store refused a hostile rejection: {exc}")
    finally:
        conn.close()
    assert rows == [("t\x00", payload.decode())]


def test_the_collector_keeps_every_hostile_message_as_a_rejection_and_goes_on(
    mosquitto: Broker, config_file: ConfigFactory, tmp_path: Path
) -> None:
    """Through the broker and the real collector: exact counts, no traceback, no internal
    error. A lone surrogate quoted in a reason used to kill the store writer (UTF-8 cannot
    encode it), and the broker sent the message again to every restart."""
    config = config_file(
        broker=mosquitto,
        overrides={
            "mqtt": {
                "inputs": [
                    {"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"},
                    {"topic": "value/{device}/{metric}", "format": "value"},
                ]
            }
        },
    )
    hostile = [
        ("fieldgate/TH-001/readings", NATIVE_BIG),
        ("fieldgate/TH-001/readings", b'{"ts": %s, "metrics": {"t": 1}}' % BIG.encode()),
        ("fieldgate/TH-001/readings", b"[" * 100_000),
        ("fieldgate/TH-001/readings", b'{"ts": 1767225600000, "metrics": {"t": NaN}}'),
        ("fieldgate/TH-001/readings", b'{"ts": 1767225600000, "metrics": {"t": 1e999}}'),
        ("fieldgate/TH-001/readings", b"\xff\xfe{}"),
        ("zigbee2mqtt/TH-001", b'{"temperature": "\\ud800"}'),
        ("zigbee2mqtt/TH-001", b'{"temperature": ' + BIG.encode() + b"}"),
        ("value/TH-001/t", b"1" * 100_000 + b"x"),
        ("value/TH-001/t", b"inf"),
    ]
    good = [
        ("fieldgate/TH-001/readings", reading_payload(T0 + i * 1000, t=i, h=1.5)) for i in range(20)
    ]
    log = tmp_path / "collector.log"
    c = Collector(config, log)
    c.start()
    try:
        c.subscribed()
        publish(mosquitto, [*good[:10], *hostile, *good[10:]])
        wait_until(lambda: count_rows(c.db, "rejected") == len(hostile), what="the rejections")
        wait_until(lambda: c.readings() == 40, what="the good readings")
        assert c.alive()
    finally:
        assert c.stop() == 0, log.read_text()
    reasons = [r for (r,) in query(c.db, "SELECT reason FROM rejected ORDER BY id")]
    assert reasons[0] == "bad JSON: an integer of more than 4300 digits"
    assert reasons[1] == "bad JSON: an integer of more than 4300 digits"
    assert reasons[2] == "bad JSON: nested too deeply"
    assert reasons[6].endswith('(temperature: "\\ud800")'), reasons[6]
    assert all("internal error" not in r for r in reasons), reasons
    text = log.read_text()
    assert "Traceback" not in text and "internal error" not in text, text
    assert c.readings() == 40


def test_a_time_too_long_to_print_is_still_a_reason() -> None:
    """A CSV time of 4300 digits in seconds is one of 4303 in milliseconds: more than
    Python prints."""
    devices = parse_config({"site": {"serial": "GW"}}, "gw.yaml").devices
    for ts, says in ((9 * 10**4302, "in the future"), (-9 * 10**4302, "before")):
        with pytest.raises(SampleError) as err:
            parse_ts(ts, devices, NOW)
        assert str(err.value).startswith("ts: an integer of about 4303 digits (out of range)")
        assert says in str(err.value)
