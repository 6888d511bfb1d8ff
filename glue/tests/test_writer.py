"""The store writer's batch commit: the native fast path and the multi-row insert store
exactly what the long path (every message validated with its reasons, one reading per
statement) stores, for usual and unusual payloads alike, in real store files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fieldgate import status, store
from fieldgate.config import Config, parse_config
from fieldgate.readings import Received, Rules, native_rows, parse_payload, rejected_payload
from fieldgate.writer import MessageReader, commit_batch

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
AT = T0 + 3_600_000  # when the batch is received
NATIVE = "fieldgate/TH-001/readings"


def config(tmp_path: Path) -> Config:
    return parse_config(
        {
            "site": {"serial": "GW"},
            "store": {"path": str(tmp_path / "unused.db")},
            "mqtt": {
                "max_payload_bytes": 512,
                "inputs": [{"topic": "tele/{device}/SENSOR", "format": "tasmota"}],
            },
            "devices": {
                "list": [
                    {"serial": "TH-001", "alias": "roof"},
                    {"serial": "TH-002"},
                    {"serial": "CSV-1", "format": "csv", "csv_columns": ["ts", "t", "h"]},
                ]
            },
        }
    )


def doc(ts: Any = T0, **metrics: Any) -> bytes:
    return json.dumps({"ts": ts, "metrics": metrics or {"temperature": 21.5}}).encode()


#: (topic, payload): the usual message and every way a native one can differ from it.
MESSAGES: list[tuple[str, bytes]] = [
    (NATIVE, doc(T0, temperature=21.5, humidity=40)),
    (NATIVE, doc(T0 + 1, temperature=-3, humidity=0, dew=-0.0)),
    (NATIVE, doc(T0, temperature=21.5, humidity=40)),  # a repeat: ignored
    (NATIVE, doc(T0, temperature=99.0)),  # same key, other value: the first stays
    (NATIVE, b'{"ts": 1767225600002, "metrics": {"t": 1}, "extra": [1, 2]}'),
    (NATIVE, b'{"ts": 1, "ts": 1767225600003, "metrics": {"t": 2}}'),
    (NATIVE, b'{"ts": 1767225600004, "metrics": {"t": %s}}' % (b"9" * 400)),
    (NATIVE, b'{"ts": 1767225600005, "metrics": {"t": %s}}' % (b"1" * 5000)),
    (NATIVE, b'{"ts": 1767225600006, "metrics": {"t": NaN}}'),
    (NATIVE, b'{"ts": 1767225600007, "metrics": {"t": -Infinity}}'),
    (NATIVE, b'{"ts": 1767225600008, "metrics": {"t": 1e999}}'),
    (NATIVE, b'{"ts": 1767225600009.0, "metrics": {"t": 1.5}}'),
    (NATIVE, b'{"ts": 1767225600010.5, "metrics": {"t": 1.5}}'),
    (NATIVE, doc("2026-01-01T00:00:11Z", t=1.5)),
    (NATIVE, doc(True, t=1.5)),
    (NATIVE, doc(None, t=1.5)),
    (NATIVE, doc(1_000, t=1.5)),  # before devices.min_ts_secs
    (NATIVE, doc(AT + 3_600_001, t=1.5)),  # past devices.max_future_secs
    (NATIVE, doc(AT + 3_600_000, t=1.6)),  # the future limit itself
    (NATIVE, b'{"ts": 1767225600012, "metrics": {}}'),
    (NATIVE, b'{"ts": 1767225600013, "metrics": [1]}'),
    (NATIVE, b'{"ts": 1767225600014}'),
    (NATIVE, b'{"metrics": {"t": 1}}'),
    (NATIVE, doc(T0 + 15, **{"bad name!": 1.0})),
    (NATIVE, doc(T0 + 16, **{"new_metric": 1.0})),  # valid, seen for the first time
    (NATIVE, doc(T0 + 17, t=True)),
    (NATIVE, doc(T0 + 18, t="1")),
    (NATIVE, doc(T0 + 19, t=None)),
    (NATIVE, doc(T0 + 20, t=[1])),
    (NATIVE, json.dumps([{"ts": T0 + 21, "metrics": {"t": 1}}, {"ts": "x"}]).encode()),
    (NATIVE, b'  {"ts": 1767225600022, "metrics": {"t": 1}}'),
    (NATIVE, b'{"ts": 1767225600023, "metrics": {"t": 1}}\n'),
    (NATIVE, b'{"ts": 1767225600024, "metrics": {"t": 1}} x'),
    (NATIVE, b'{"ts": 1767225600025, "metrics": {"t": 1}'),
    (NATIVE, b""),
    (NATIVE, b"[]"),
    (NATIVE, b'"text"'),
    (NATIVE, b"\xff\xfe"),
    (NATIVE, b'{"ts": 1767225600026, "metrics": {"t\\ud800": 1}}'),
    (NATIVE, b"[" * 100_000 + b"]" * 100_000),  # over max_payload_bytes
    (NATIVE, b"[" * 200 + b"]" * 200),  # deep, within the size limit
    (NATIVE, doc(T0 + 27, t=1.5, padding="x" * 600)),  # over max_payload_bytes
    ("fieldgate/roof/readings", doc(T0 + 28, t=2.5)),  # an alias: stored as TH-001
    ("fieldgate/TH-002/readings", doc(T0 + 29, t=3.5)),
    ("fieldgate/XX-9/readings", doc(T0 + 30, t=3.5)),  # unknown device
    ("fieldgate//readings", doc(T0 + 31, t=3.5)),
    ("fieldgate/CSV-1/readings", b"1767225600032,1.5,40\n1767225600033,x,41\n"),
    ("fieldgate/CSV-1/readings", doc(T0 + 34, t=1.0)),  # JSON from a CSV device
    ("tele/TH-001/SENSOR", b'{"Time": "2026-01-01T00:00:35", "AM2301": {"Temperature": 20}}'),
    ("tele/TH-001/SENSOR", b'{"TempUnit": "C"}'),
    ("somewhere/else", doc(T0 + 36, t=1.0)),
    (NATIVE, doc(T0 + 37, temperature=22.5, humidity=41)),
]


def stored(conn: sqlite3.Connection) -> tuple[list[tuple], list[tuple], dict[str, str]]:
    readings = conn.execute(
        "SELECT device, ts, metric, value, received_at, source FROM readings ORDER BY id"
    ).fetchall()
    rejected = conn.execute(
        "SELECT received_at, source, topic, payload, reason FROM rejected ORDER BY id"
    ).fetchall()
    counters = {k: v for k, (v, _) in store.get_state(conn).items() if "input" in k}
    return readings, rejected, counters


def long_path(conn: sqlite3.Connection, reader: MessageReader, items: list) -> tuple:
    """The batch as the writer stored it before the fast path: every message read with its
    reasons; each input's readings (inputs in the order they first came) inserted one
    statement per reading."""
    received = [reader.read(t, p, at, stamp) for t, p, at, stamp in items]
    groups: dict[str, list[Received]] = {}
    for r in received:
        groups.setdefault(r.input, []).append(r)
    new_by_input: dict[str, int] = {}
    with store.transaction(conn):
        for key, group in groups.items():
            before = conn.total_changes
            conn.executemany(
                store.INSERT_READING_SQL,
                [
                    (d, ts, m, v, r.received_at, "mqtt")
                    for r in group
                    for d, ts, m, v in r.outcome.readings
                ],
            )
            new_by_input[key] = conn.total_changes - before
        for r in received:
            if r.outcome.reason is not None:
                store.insert_rejected(
                    conn,
                    source="mqtt",
                    topic=r.topic,
                    payload=rejected_payload(r.payload),
                    reason=r.outcome.reason,
                    received_at=r.received_at,
                )
        reader.count(received, [item[3] for item in items], {}, new_by_input)
        for key, value in reader.counters.changed():
            store.set_state(conn, key, value)
    bad = [(r.topic, r.outcome.reason) for r in received if r.outcome.reason is not None]
    return sum(new_by_input.values()), bad


def test_fast_path_stores_what_the_long_path_stores(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    items = [(t, p, AT, T0 + 500 + i) for i, (t, p) in enumerate(MESSAGES)]
    fast = store.open_store(tmp_path / "fast.db", "GW")
    slow = store.open_store(tmp_path / "slow.db", "GW")
    fast_reader = MessageReader(cfg, {})
    slow_reader = MessageReader(cfg, {})
    # twice: the second time every metric name is known and the usual messages are repeats
    for _ in range(2):
        result = commit_batch(fast, fast_reader, items)
        new, bad = long_path(slow, slow_reader, items)
        assert result[0] == "done"
        assert result[1] == new
        assert result[2] == len(bad)
        assert result[3] == bad[:3]
        assert stored(fast) == stored(slow)
        # status's counters (the second time, every reading is a repeat)
        assert status.store_counts(fast) == status.scan_counts(fast)
    readings, rejected, counters = stored(fast)
    assert readings[0] == ("TH-001", T0, "temperature", 21.5, AT, "mqtt")
    assert ("TH-001", T0 + 28, "t", 2.5, AT, "mqtt") in readings  # the alias's serial
    assert ("TH-001", T0 + 2, "t", 1.0, AT, "mqtt") in readings  # extra keys ignored
    assert len(rejected) == 2 * len(bad) and all(r[4] for r in rejected)
    native = json.loads(counters["collector.input.fieldgate/{device}/readings"])
    assert native["messages"] == 2 * sum(1 for t, _ in MESSAGES if t.startswith("fieldgate/"))
    tasmota = json.loads(counters["collector.input.tele/{device}/SENSOR"])
    assert native["readings"] + tasmota["readings"] == len(readings)


@pytest.mark.parametrize("topic,payload", MESSAGES)
def test_native_rows_takes_a_payload_only_with_the_long_paths_result(
    tmp_path: Path, topic: str, payload: bytes
) -> None:
    rules = Rules.from_config(config(tmp_path))
    device = topic.split("/")[1] if topic.startswith("fieldgate/") else ""
    if not device or device in ("XX-9", "CSV-1"):
        return  # the writer sends these topics the long way (test_fast_target)
    serial, _ = rules.resolve(device)
    outcome = parse_payload(device, payload, rules, now_ms=AT)  # (learns valid metric names)
    into: list[object] = ["before"]
    took = native_rows(payload, serial, AT, rules, source="mqtt", into=into)
    if took:
        assert outcome.reason is None
        rows = [(d, ts, m, v, AT, "mqtt") for d, ts, m, v in outcome.readings]
        assert into[1:] == [x for row in rows for x in row]
    else:
        assert into == ["before"]


def test_native_rows_takes_the_usual_payload(tmp_path: Path) -> None:
    rules = Rules.from_config(config(tmp_path))
    parse_payload("TH-001", doc(T0, temperature=1.0, humidity=2.0), rules, now_ms=AT)
    into: list[object] = []
    payload = doc(T0, temperature=21, humidity=40.5)
    assert native_rows(payload, "TH-001", AT, rules, source="mqtt", into=into)
    first = ["TH-001", T0, "temperature", 21.0, AT, "mqtt"]
    assert into == [*first, "TH-001", T0, "humidity", 40.5, AT, "mqtt"]


def test_fast_target(tmp_path: Path) -> None:
    reader = MessageReader(config(tmp_path), {})
    native, tasmota = reader.table.inputs
    key = "fieldgate/{device}/readings"
    assert reader.fast_target(NATIVE) == (key, "TH-001", native, None)
    assert reader.fast_target("fieldgate/roof/readings") == (key, "TH-001", native, None)
    assert reader.fast_target("fieldgate/CSV-1/readings") is None
    assert reader.fast_target("fieldgate/XX-9/readings") is None
    assert reader.fast_target("tele/roof/SENSOR") == (tasmota.key, "TH-001", tasmota, None)
    assert reader.fast_target("tele/CSV-1/SENSOR") == (tasmota.key, "CSV-1", tasmota, None)
    assert reader.fast_target("tele/XX-9/SENSOR") is None
    assert reader.fast_target("somewhere/else") is None


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 63, 64, 127, 128, 129, 255, 256, 300, 1000])
def test_insert_reading_rows_is_one_insert_per_reading(tmp_path: Path, rows: int) -> None:
    one = store.open_store(tmp_path / "one.db", "GW")
    many = store.open_store(tmp_path / "many.db", "GW")
    readings = [("TH-001", T0 + i // 2, f"m{i % 3}", i / 7, AT, "mqtt") for i in range(rows)]
    with store.transaction(one):
        before = one.total_changes
        one.executemany(store.INSERT_READING_SQL, readings)
        expected = one.total_changes - before
    with store.transaction(many):
        flat = [x for r in readings for x in r]
        assert store.insert_reading_rows(many, flat) == expected
        assert store.insert_reading_rows(many, flat) == 0  # all stored already
    query = "SELECT id, device, ts, metric, value, received_at, source FROM readings"
    assert many.execute(query).fetchall() == one.execute(query).fetchall()


def test_insert_reading_rows_refuses_a_partial_reading(tmp_path: Path) -> None:
    conn = store.open_store(tmp_path / "s.db", "GW")
    with pytest.raises(ValueError, match="not whole readings"):
        store.insert_reading_rows(conn, ["TH-001", T0, "t", 1.0, AT])


def test_received_items_keep_their_input(tmp_path: Path) -> None:
    reader = MessageReader(config(tmp_path), {})
    r = reader.read("tele/TH-001/SENSOR", b'{"Time": "2026-01-01T00:00:35", "A": {"T": 1}}', AT, T0)
    assert isinstance(r, Received) and r.input == "tele/{device}/SENSOR"
