"""Inputs (docs/inputs.md): their configuration, topic templates, matching, and the validation
of decoded payloads (the same rules as the native format), without a broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import run_fieldgate

from fieldgate.config import parse_config
from fieldgate.errors import ConfigError
from fieldgate.inputs import InputTable, metric_filter, read_message
from fieldgate.readings import Rules
from fieldgate.topics import overlap, parse_template

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DEVICES = {"list": [{"serial": "TH-001", "alias": "roof"}, {"serial": "isems-7"}]}


def config(*inputs: dict[str, Any], **extra: Any) -> Any:
    data: dict[str, Any] = {
        "site": {"serial": "GW"},
        "devices": DEVICES,
        "mqtt": {"inputs": list(inputs)},
    }
    data.update(extra)
    return parse_config(data, "gw.yaml")


# ---- configuration: one line naming the key ---------------------------------------------


@pytest.mark.parametrize(
    ("inp", "message"),
    [
        (
            {"topic": "tele/{device}/SENSOR", "format": "tasmotta"},
            "gw.yaml: mqtt.inputs[0].format: must be one of fieldgate, csv, value, json, tasmota",
        ),
        (
            {"topic": "{device}/x/{device}", "format": "json"},
            "gw.yaml: mqtt.inputs[0].topic: '{device}/x/{device}': {device} may appear only once",
        ),
        (
            {"topic": "a/{metric}/{metric}", "format": "value", "device": "roof"},
            "mqtt.inputs[0].topic: 'a/{metric}/{metric}': {metric} may appear only once",
        ),
        ({"topic": "a/#/{device}", "format": "json"}, "'#' must be the last level"),
        ({"topic": "a/x#/{device}", "format": "json"}, "'#' and '+' must be whole levels"),
        ({"topic": "a/dev-{device}", "format": "json"}, "{device} and {metric} must be whole"),
        ({"topic": "$SYS/{device}", "format": "json"}, "topics starting with $ are the broker's"),
        ({"topic": "", "format": "json"}, "mqtt.inputs[0].topic: '': empty topic"),
        ({"topic": "a/{device}", "format": "csv"}, "mqtt.inputs[0].csv: required for format csv"),
        (
            {"topic": "a/{device}", "format": "csv", "csv": {"columns": ["ts", "bad name"]}},
            "mqtt.inputs[0].csv.columns[1]: 'bad name' is not ts, device, - or a metric name",
        ),
        (
            {"topic": "a/{device}", "format": "csv", "csv": {"columns": ["ts", "a", "a"]}},
            "mqtt.inputs[0].csv.columns[2]: 'a' appears twice",
        ),
        (
            {"topic": "a/{device}", "format": "csv", "csv": {"columns": ["ts", "-", "device"]}},
            "mqtt.inputs[0].csv.columns: no metric column",
        ),
        (
            {"topic": "a/{device}", "format": "csv", "csv": {"columns": []}},
            "mqtt.inputs[0].csv.columns: empty",
        ),
        (
            {"topic": "a/{device}", "format": "csv", "csv": {"columns": ["a"], "delimiter": ";;"}},
            "mqtt.inputs[0].csv.delimiter: ';;': one character",
        ),
        (
            {"topic": "a/{device}", "format": "csv", "csv": {"columns": ["a"], "ts_unit": "h"}},
            "mqtt.inputs[0].csv.ts_unit: must be one of s, ms, us, ns",
        ),
        (
            {"topic": "a/{device}", "format": "json", "csv": {"columns": ["a"]}},
            "mqtt.inputs[0].csv: only for format csv (this is json)",
        ),
        (
            {"topic": "a/{device}", "format": "tasmota", "ts_path": "Time"},
            "mqtt.inputs[0].ts_path: only for format json",
        ),
        (
            {"topic": "a/{device}", "format": "csv", "csv": {"columns": ["a"]}, "ts_unit": "s"},
            "mqtt.inputs[0].ts_unit: only for format json (csv: csv.ts_unit)",
        ),
        ({"topic": "a/{device}", "format": "json", "ts_path": "a..b"}, "is not a dotted path"),
        (
            {"topic": "a/{device}", "format": "json", "influx_precision": "s"},
            "mqtt.inputs[0].influx_precision: only for format influx",
        ),
        ({"topic": "a/{device}", "format": "value"}, "format value needs a {metric} level"),
        (
            {"topic": "a/{device}/{metric}", "format": "fieldgate"},
            "fieldgate payloads name their metrics: no {metric}",
        ),
        ({"topic": "a/{device}", "include": ["t*"]}, "include: not for format fieldgate"),
        ({"topic": "a/b", "format": "json"}, "'a/b' names no device: add a {device} level or set"),
        (
            {"topic": "a/{device}", "format": "json", "device": "roof"},
            "mqtt.inputs[0].device: the device is already named by a {device} level",
        ),
        (
            {"topic": "a/b", "format": "json", "device": "nobody"},
            "mqtt.inputs[0].device: 'nobody' is not in devices.list",
        ),
        (
            {"topic": "a/{device}", "format": "json", "exclude": ["a b*"]},
            "mqtt.inputs[0].exclude[0]: 'a b*': can never match a metric name",
        ),
        (
            {"topic": "a/{device}", "format": "json", "include": ["temp[0-9"]},
            "mqtt.inputs[0].include[0]: 'temp[0-9': '[' is never closed",
        ),
        (
            {"topic": "a/{device}", "format": "json", "timezone": "Europe/Berlinn"},
            "mqtt.inputs[0].timezone: unknown time zone 'Europe/Berlinn' (an IANA name",
        ),
        (
            {"topic": "fieldgate/{device}/+", "format": "json"},
            "mqtt.inputs[0].topic: 'fieldgate/{device}/+' overlaps the native topic "
            "('fieldgate/{device}/readings'): a message on 'fieldgate/x/readings' would match both",
        ),
        ({"topic": "#", "format": "json", "device": "roof"}, "overlaps the native topic"),
        ({"topic": "a/{device}", "format": "json", "sort": 1}, "mqtt.inputs[0].sort: unknown key"),
    ],
)
def test_a_bad_input_is_refused_with_one_line_naming_the_key(inp: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(inp)
    text = str(caught.value)
    assert message in text, text
    assert "\n" not in text


def test_overlapping_inputs_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        config(
            {"topic": "tele/{device}/SENSOR", "format": "tasmota"},
            {"topic": "tele/+/{device}", "format": "json"},
        )
    assert str(caught.value) == (
        "gw.yaml: mqtt.inputs[1].topic: 'tele/+/{device}' overlaps mqtt.inputs[0].topic "
        "('tele/{device}/SENSOR'): a message on 'tele/x/SENSOR' would match both"
    )


def test_poll_nodes_take_format_options() -> None:
    node = {"name": "isems", "url": "http://192.0.2.7/log.csv", "device": "isems-7"}
    cfg = config(
        poll={"nodes": [{**node, "format": "csv", "csv": {"delimiter": ";", "columns": ["a"]}}]}
    )
    assert cfg.poll.nodes[0].csv.delimiter == ";"
    with pytest.raises(ConfigError, match=r"poll\.nodes\[0\]\.csv: required for format csv"):
        config(poll={"nodes": [{**node, "format": "csv"}]})
    with pytest.raises(ConfigError, match=r"poll\.nodes\[0\]\.format: value names its metric"):
        config(poll={"nodes": [{**node, "format": "value"}]})


def test_the_contract_example_is_accepted() -> None:
    """docs/contract.md §9's example, verbatim."""
    cfg = config(
        {"topic": "tele/{device}/SENSOR", "format": "tasmota"},
        {
            "topic": "zigbee2mqtt/{device}",
            "format": "zigbee2mqtt",
            "exclude": ["linkquality", "update.*"],
        },
        {"topic": "{device}/events/rpc", "format": "shelly"},
        {"topic": "{device}/sensor/{metric}/state", "format": "value"},
        {
            "topic": "isems/{device}/csvlog",
            "format": "csv",
            "csv": {
                "delimiter": ";",
                "columns": [
                    "device",
                    "-",
                    "ts",
                    "-",
                    "time_to_shutdown",
                    "power_save",
                    "open_circuit_voltage",
                ],
                "ts_unit": "s",
            },
        },
        {"topic": "telegraf/{device}", "format": "influx"},
        {"topic": "tb/{device}/telemetry", "format": "thingsboard"},
    )
    assert [i.template.filter for i in cfg.mqtt.inputs] == [
        "tele/+/SENSOR",
        "zigbee2mqtt/+",
        "+/events/rpc",
        "+/sensor/+/state",
        "isems/+/csvlog",
        "telegraf/+",
        "tb/+/telemetry",
    ]


def test_check_config_lists_what_the_collector_subscribes_to(tmp_path: Path) -> None:
    path = tmp_path / "fieldgate.yaml"
    path.write_text(
        "site: {serial: GW-1}\n"
        "devices: {list: [{serial: TH-001}]}\n"
        "mqtt:\n  inputs:\n"
        "    - {topic: 'tele/{device}/SENSOR', format: tasmota}\n"
        "    - {topic: 'shellies/{device}/events/rpc', format: shelly}\n"
        "poll:\n  nodes:\n"
        "    - {name: n1, url: 'http://192.0.2.1/s.json', device: TH-001, format: json}\n"
    )
    r = run_fieldgate("check-config", config=path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"{path}: valid (site GW-1, 1 devices)",
        "input fieldgate/{device}/readings (fieldgate): subscribes to fieldgate/+/readings",
        "input tele/{device}/SENSOR (tasmota): subscribes to tele/+/SENSOR",
        "input shellies/{device}/events/rpc (shelly): subscribes to shellies/+/events/rpc",
        "poll node n1 (json): http://192.0.2.1/s.json for device TH-001",
    ]
    path.write_text(path.read_text().replace("format: shelly", "format: shelley"))
    r = run_fieldgate("check-config", config=path)
    assert r.returncode == 2
    assert r.stderr.startswith(f"fieldgate: error: {path}: mqtt.inputs[1].format: must be one of")
    assert r.stderr.count("\n") == 1


# ---- templates and matching --------------------------------------------------------------


def test_overlap_names_a_topic_both_match() -> None:
    t = parse_template
    assert overlap(t("tele/{device}/SENSOR"), t("tele/{device}/STATE")) is None
    assert overlap(t("a/#"), t("a")) == "a"
    assert overlap(t("#"), t("x/{device}")) == "x/x"
    assert overlap(t("{device}/sensor/{metric}/state"), t("fieldgate/+/readings")) is None
    assert overlap(t("+/events/rpc"), t("shelly1/{device}/rpc")) == "shelly1/events/rpc"


def test_table_matches_topics_to_inputs_and_captures_levels() -> None:
    cfg = config(
        {"topic": "tele/{device}/SENSOR", "format": "tasmota"},
        {"topic": "{device}/sensor/{metric}/state", "format": "value"},
        {"topic": "site/boiler/#", "format": "json", "device": "roof"},
    )
    table = InputTable(cfg)
    assert table.filters == [
        "fieldgate/+/readings",
        "tele/+/SENSOR",
        "+/sensor/+/state",
        "site/boiler/#",
    ]

    def m(topic: str) -> tuple[str, str | None, str | None] | None:
        got = table.match(topic)
        return None if got is None else (got[0].key, got[1], got[2])

    for _ in range(2):  # the second round comes from the cache
        assert m("fieldgate/TH-001/readings") == ("fieldgate/{device}/readings", "TH-001", None)
        assert m("tele/roof/SENSOR") == ("tele/{device}/SENSOR", "roof", None)
        assert m("node1/sensor/temperature/state") == (
            "{device}/sensor/{metric}/state",
            "node1",
            "temperature",
        )
        assert m("site/boiler") == ("site/boiler/#", "roof", None)
        assert m("site/boiler/a/b") == ("site/boiler/#", "roof", None)
        assert m("tele/roof/STATE") is None
        assert m("node1/sensor/temperature") is None


def test_metric_filter() -> None:
    keep = metric_filter(["temp*", "update.*"], ["*.state"])
    assert keep is not None
    assert [n for n in ("temperature", "update.state", "update.progress", "rh") if keep(n)] == [
        "temperature",
        "update.progress",
    ]
    assert metric_filter([], []) is None


# ---- the validation of decoded payloads ----------------------------------------------------


def read(cfg: Any, topic: str, payload: str | bytes, *, stamp: int = T0 + 5, now: int = T0):
    inp, device, metric = InputTable(cfg).match(topic)
    raw = payload.encode() if isinstance(payload, str) else payload
    return read_message(inp, device, metric, raw, Rules.from_config(cfg), stamp=stamp, now_ms=now)


def test_alias_resolves_to_serial_and_readings_without_time_take_the_stamp() -> None:
    cfg = config({"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"})
    o = read(cfg, "zigbee2mqtt/roof", '{"temperature": 21.5, "action": "single"}')
    assert o.readings == [("TH-001", T0 + 5, "temperature", 21.5)]
    assert (o.reason, o.skipped, o.stamped) == (None, 1, True)


def test_unknown_device_and_time_bounds_as_for_the_native_format() -> None:
    cfg = config({"topic": "tele/{device}/SENSOR", "format": "tasmota"})
    o = read(cfg, "tele/nobody/SENSOR", '{"A": {"T": 1}}')
    assert o.reason.startswith("unknown device 'nobody': not in devices.list")
    o = read(cfg, "tele/roof/SENSOR", '{"Time": "1970-01-01T00:00:48", "A": {"T": 1}}')
    assert o.readings == []
    assert o.reason.startswith("ts: 48000 (1970-01-01T00:00:48")
    assert "is before devices.min_ts_secs" in o.reason


def test_a_message_without_a_reading_is_rejected_with_the_reason() -> None:
    cfg = config(
        {"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt", "exclude": ["linkquality"]}
    )
    o = read(cfg, "zigbee2mqtt/roof", '{"action": "single", "identify": null, "linkquality": 9}')
    assert o.readings == []
    assert o.reason == (
        'no reading: 2 values are not numbers (action: "single", identify: null); '
        "1 left out by include/exclude"
    )


def test_bad_metric_name_rejects_that_value_and_keeps_the_rest() -> None:
    cfg = config({"topic": "tele/{device}/SENSOR", "format": "tasmota"})
    o = read(cfg, "tele/roof/SENSOR", '{"Time": "2026-01-01T00:00:00", "ok": 1, "bad name": 2}')
    assert o.readings == [("TH-001", T0, "ok", 1.0)]
    assert o.reason == (
        "1 readings stored, rejected: metric name 'bad name' is not valid "
        "(letters, digits, _ . : % -)"
    )


def test_non_finite_line_protocol_value_is_rejected() -> None:
    cfg = config({"topic": "telegraf/{device}", "format": "influx"})
    o = read(cfg, "telegraf/roof", "m a=1e999,b=2 1767225600000000000")
    assert o.readings == [("TH-001", T0, "m.b", 2.0)]
    assert "line 1: m.a: inf is not a finite number" in o.reason


def test_csv_device_column_must_agree_with_the_topic() -> None:
    cfg = config(
        {
            "topic": "isems/{device}/csvlog",
            "format": "csv",
            "csv": {"delimiter": ";", "columns": ["device", "ts", "v"], "ts_unit": "s"},
        }
    )
    o = read(cfg, "isems/isems-7/csvlog", "isems-7;1767225600;1\nroof;1767225660;2\n")
    assert o.readings == [("isems-7", T0, "v", 1.0)]
    assert o.reason == (
        "1 of 2 samples rejected, the other 1 stored: line 2: "
        "device 'roof' is not the topic's device 'isems-7'"
    )


def test_csv_device_column_names_the_device_when_the_topic_does_not() -> None:
    cfg = config(
        {
            "topic": "site/log",
            "format": "csv",
            "csv": {"columns": ["device", "ts", "v"], "ts_unit": "s"},
        }
    )
    o = read(cfg, "site/log", "roof,1767225600,1\nisems-7,1767225600,2\n")
    assert o.readings == [("TH-001", T0, "v", 1.0), ("isems-7", T0, "v", 2.0)]


def test_two_lines_without_their_own_time_cannot_share_the_stamp() -> None:
    cfg = config({"topic": "a/{device}", "format": "csv", "csv": {"columns": ["temperature"]}})
    o = read(cfg, "a/roof", "21.5\n21.6\n")
    assert o.readings == [("TH-001", T0 + 5, "temperature", 21.5)]
    assert o.reason == (
        "1 readings stored, rejected: line 2: temperature: a second value for the same time, "
        "the message's arrival time (also in line 1)"
    )


def test_the_same_reading_twice_in_one_message_is_one_reading() -> None:
    cfg = config({"topic": "telegraf/{device}", "format": "influx"})
    o = read(
        cfg, "telegraf/roof", "m,host=a v=1 1767225600000000000\nm,host=a v=1 1767225600000000000"
    )
    assert o.readings == [("TH-001", T0, "m.v", 1.0)] and o.reason is None


def test_ts_from_arrival_ignores_the_devices_clock() -> None:
    cfg = config({"topic": "tele/{device}/SENSOR", "format": "tasmota", "ts_from": "arrival"})
    o = read(cfg, "tele/roof/SENSOR", '{"Time": "1970-01-01T00:00:48", "A": {"T": 1}}')
    assert o.readings == [("TH-001", T0 + 5, "A.T", 1.0)] and o.reason is None


def test_payload_limits_apply_to_every_format() -> None:
    cfg = config({"topic": "zigbee2mqtt/{device}", "format": "zigbee2mqtt"})
    o = read(cfg, "zigbee2mqtt/roof", b"\xff\xfe")
    assert o.reason == "payload is not valid UTF-8 (byte 0)"
    big = '{"a": "' + "x" * 300_000 + '"}'
    assert "over mqtt.max_payload_bytes" in read(cfg, "zigbee2mqtt/roof", big).reason


def test_value_input_names_the_metric_by_the_topic() -> None:
    cfg = config({"topic": "{device}/sensor/{metric}/state", "format": "value"})
    o = read(cfg, "roof/sensor/outside_temperature/state", "-3.5")
    assert o.readings == [("TH-001", T0 + 5, "outside_temperature", -3.5)]
    o = read(cfg, "roof/sensor/outside_temperature/state", "nan")
    assert o.reason == 'no reading: 1 values are not numbers (outside_temperature: "nan")'
