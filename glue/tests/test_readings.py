"""Payload parsing and validation (docs/contract.md §4): what is stored, what is rejected, why."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fieldgate import store
from fieldgate.config import parse_config
from fieldgate.readings import (
    REJECTED_PAYLOAD_KEEP,
    Received,
    Rules,
    device_from_topic,
    parse_message,
    parse_payload,
    store_outcomes,
)

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
T = NOW - 60_000


def rules(**devices: object) -> Rules:
    cfg = parse_config(
        {
            "site": {"serial": "GW"},
            "mqtt": {"max_payload_bytes": 1024},
            "devices": {
                "list": [
                    {"serial": "TH-001", "alias": "roof"},
                    {"serial": "CSV-1", "format": "csv", "csv_columns": ["ts", "t", "h"]},
                ],
                **devices,
            },
        }
    )
    return Rules.from_config(cfg)


R = rules()


def ok(payload: object, device: str = "TH-001", r: Rules = R) -> list[tuple]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    out = parse_payload(device, raw, r, now_ms=NOW)
    assert out.reason is None, out.reason
    return out.readings


def rejected(payload: object, device: str = "TH-001", r: Rules = R) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    out = parse_payload(device, raw, r, now_ms=NOW)
    assert out.reason is not None and not out.readings, out
    return out.reason


def test_object_with_epoch_ms() -> None:
    assert ok({"ts": T, "metrics": {"t": 21.5, "h": 40}}) == [
        ("TH-001", T, "t", 21.5),
        ("TH-001", T, "h", 40.0),
    ]


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-01-01T00:00:00Z", NOW),
        ("2026-01-01T00:00:00.123Z", NOW + 123),
        ("2026-01-01T00:00:00.123456789Z", NOW + 123),
        ("2026-01-01T01:30:00+01:30", NOW),
        ("2025-12-31T19:00:00-05:00", NOW),
        ("2026-01-01 00:00:00z", NOW),
        (float(T), T),
    ],
)
def test_timestamps(ts: object, expected: int) -> None:
    assert ok({"ts": ts, "metrics": {"x": 1}}) == [("TH-001", expected, "x", 1.0)]


def test_alias_is_stored_as_the_serial() -> None:
    assert ok({"ts": T, "metrics": {"x": 1}}, device="roof") == [("TH-001", T, "x", 1.0)]


def test_array_of_objects() -> None:
    payload = [{"ts": T + i, "metrics": {"x": i}} for i in range(3)]
    assert ok(payload) == [("TH-001", T + i, "x", float(i)) for i in range(3)]


def test_array_with_bad_elements_stores_the_good_ones_and_names_the_bad() -> None:
    payload = [
        {"ts": T, "metrics": {"x": 1}},
        {"ts": T + 1, "metrics": {"x": "NaN"}},
        {"ts": T + 2, "metrics": {"x": 3}},
        {"metrics": {"x": 4}},
    ]
    out = parse_payload("TH-001", json.dumps(payload).encode(), R, now_ms=NOW)
    assert out.readings == [("TH-001", T, "x", 1.0), ("TH-001", T + 2, "x", 3.0)]
    assert out.reason == (
        '2 of 4 samples rejected, the other 2 stored: element 1: metrics.x: "NaN" is not a '
        "number; element 3: ts: missing"
    )
    assert (out.samples, out.bad_samples) == (4, 2)


def test_one_bad_metric_rejects_its_whole_sample() -> None:
    reason = rejected({"ts": T, "metrics": {"good": 1, "bad": [1]}})
    assert reason == "metrics.bad: [1] is not a number"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "bad JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        (b"", "bad JSON: Expecting value at line 1 column 1"),
        (b"42", "expected a JSON object or array, got a number"),
        (b"null", "expected a JSON object or array, got null"),
        (b"[]", "empty JSON array: no readings"),
        (b"[1]", "element 0: expected an object with ts and metrics, got a number"),
        (b'{"ts": 1767225540000, "metrics": {"x": NaN}}', "bad JSON: NaN is not allowed in JSON"),
        (b'{"ts": 1767225540000, "metrics": {"x": -Infinity}}', "bad JSON: -Infinity is not"),
        (b'{"ts": 1767225540000, "metrics": {"x": 1e999}}', "metrics.x: inf is not a finite"),
        (b'{"ts": 1767225540000, "metrics": {"x": true}}', "metrics.x: true is not a number"),
        (b'{"ts": 1767225540000, "metrics": {"x": null}}', "metrics.x: missing value (null)"),
        (b'{"ts": 1767225540000, "metrics": {"x": "1.5"}}', 'metrics.x: "1.5" is not a number'),
        (b'{"ts": 1767225540000, "metrics": {}}', "metrics: empty"),
        (b'{"ts": 1767225540000, "metrics": [1]}', "metrics: expected an object"),
        (b'{"ts": 1767225540000}', "metrics: missing"),
        (b'{"metrics": {"x": 1}}', "ts: missing"),
        (b'{"ts": true, "metrics": {"x": 1}}', "ts: expected epoch milliseconds"),
        (b'{"ts": 1.5, "metrics": {"x": 1}}', "ts: epoch milliseconds must be an integer"),
        (b'{"ts": [], "metrics": {"x": 1}}', "ts: expected epoch milliseconds or an RFC 3339"),
        (b'{"ts": "2026-01-01T00:00:00", "metrics": {"x": 1}}', "with a time zone"),
        (b'{"ts": "2026-02-30T00:00:00Z", "metrics": {"x": 1}}', "is not a valid date-time"),
        (b'{"ts": 1767225540, "metrics": {"x": 1}}', "seconds instead of milliseconds"),
        (b'{"ts": 0, "metrics": {"x": 1}}', "is before devices.min_ts_secs (2000-01-01T00:00:00Z)"),
        (b'{"ts": -5, "metrics": {"x": 1}}', "is before devices.min_ts_secs"),
        (
            b'{"ts": 1767232800001, "metrics": {"x": 1}}',
            "is more than devices.max_future_secs (3600 s) in the future",
        ),
        (b'{"ts": 99999999999999999999999, "metrics": {"x": 1}}', "in the future"),
        (b'{"ts": 1767225540000, "metrics": {"a b": 1}}', "metric name 'a b' is not valid"),
        (b'{"ts": 1767225540000, "metrics": {"": 1}}', "metric name '' is not valid"),
        (b'{"ts": 1767225540000, "metrics": {"x,y": 1}}', "metric name 'x,y' is not valid"),
        (b"\xc3\x28", "payload is not valid UTF-8 (byte 0)"),
        (b"x" * 1025, "payload of 1025 bytes is over mqtt.max_payload_bytes (1024)"),
    ],
)
def test_rejections_have_reasons(payload: bytes, reason: str) -> None:
    assert reason in rejected(payload)


def test_future_limit_is_inclusive() -> None:
    assert ok({"ts": NOW + 3600 * 1000, "metrics": {"x": 1}})


def test_unknown_device_is_rejected_unless_allowed() -> None:
    assert rejected({"ts": T, "metrics": {"x": 1}}, device="TH-9") == (
        "unknown device 'TH-9': not in devices.list (devices.allow_unknown is false)"
    )
    open_rules = rules(allow_unknown=True)
    assert ok({"ts": T, "metrics": {"x": 1}}, device="TH-9", r=open_rules) == [
        ("TH-9", T, "x", 1.0)
    ]
    assert "is not valid" in rejected({"ts": T, "metrics": {"x": 1}}, "a b", r=open_rules)
    assert rejected({"ts": T, "metrics": {"x": 1}}, "TH:9", r=open_rules) == (
        "device name 'TH:9' is not valid (letters, digits, _ . -)"
    )


def test_metric_names_may_hold_colon_and_percent() -> None:
    assert ok({"ts": T, "metrics": {"temperature:0.tC": 21.5, "rh%": 40}}) == [
        ("TH-001", T, "temperature:0.tC", 21.5),
        ("TH-001", T, "rh%", 40.0),
    ]


def test_extra_keys_are_ignored() -> None:
    assert ok({"ts": T, "metrics": {"x": 1}, "seq": 7, "fw": "1.2"}) == [("TH-001", T, "x", 1.0)]


def test_csv_lines_with_header_and_blank_lines() -> None:
    payload = f"ts,t,h\n{T},21.5,40\n\n2026-01-01T00:00:00Z, 22 , 41.5\n".encode()
    assert ok(payload, device="CSV-1") == [
        ("CSV-1", T, "t", 21.5),
        ("CSV-1", T, "h", 40.0),
        ("CSV-1", NOW, "t", 22.0),
        ("CSV-1", NOW, "h", 41.5),
    ]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty CSV payload: no data line"),
        (b"ts,t,h\n", "empty CSV payload: no data line"),
        (f"{T},1\n".encode(), "2 fields, expected 3 (ts,t,h)"),
        (f"{T},1,nan\n".encode(), "metrics.h: nan is not a finite number"),
        (f"{T},,2\n".encode(), "metrics.t: missing value (empty field)"),
        (f"{T},warm,2\n".encode(), "metrics.t: 'warm' is not a number"),
        (b",1,2\n", "ts: missing"),
        (b"yesterday,1,2\n", "is not an RFC 3339 date-time"),
    ],
)
def test_csv_rejections(payload: bytes, reason: str) -> None:
    assert reason in rejected(payload, device="CSV-1")


def test_csv_bad_line_is_named_and_the_others_stored() -> None:
    out = parse_payload("CSV-1", f"{T},1,2\n{T + 1},x,2\n".encode(), R, now_ms=NOW)
    assert out.readings == [("CSV-1", T, "t", 1.0), ("CSV-1", T, "h", 2.0)]
    assert out.reason == (
        "1 of 2 samples rejected, the other 1 stored: line 2: metrics.t: 'x' is not a number"
    )


def test_topics() -> None:
    assert device_from_topic("fieldgate/TH-001/readings", "fieldgate") == "TH-001"
    assert device_from_topic("fieldgate/TH-001/status", "fieldgate") is None
    assert device_from_topic("other/TH-001/readings", "fieldgate") is None
    assert device_from_topic("fieldgate/a/b/readings", "fieldgate") is None
    out = parse_message("fieldgate//readings", b"{}", R, now_ms=NOW)
    assert out.reason == "the topic names no device"


def test_many_bad_samples_are_summarised() -> None:
    payload = [{"ts": T, "metrics": {"x": "bad"}}] * 8
    reason = rejected(payload)
    assert reason.startswith("8 of 8 samples rejected: element 0:")
    assert reason.endswith("; and 3 more")


def test_store_outcomes_keeps_payload_and_is_idempotent_for_readings(tmp_path: Path) -> None:
    conn = store.open_store(tmp_path / "s.db", "GW")
    good = json.dumps({"ts": T, "metrics": {"x": 1}}).encode()
    big = b"\xff" * 5000
    items = [
        Received(
            "fieldgate/TH-001/readings",
            good,
            NOW,
            parse_message("fieldgate/TH-001/readings", good, R, now_ms=NOW),
        ),
        Received(
            "fieldgate/TH-001/readings",
            big,
            NOW,
            parse_message("fieldgate/TH-001/readings", big, R, now_ms=NOW),
        ),
    ]
    with store.transaction(conn):
        assert store_outcomes(conn, items, source="mqtt") == 1
    with store.transaction(conn):
        assert store_outcomes(conn, items[:1], source="mqtt") == 0
    rows = conn.execute("SELECT payload, reason FROM rejected").fetchall()
    conn.close()
    assert len(rows) == 1
    payload, reason = rows[0]
    assert payload == b"\xff" * REJECTED_PAYLOAD_KEEP
    assert reason.startswith("payload of 5000 bytes is over mqtt.max_payload_bytes (1024)")
    check = sqlite3.connect(str(tmp_path / "s.db"))
    assert check.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 1
    check.close()
