"""The device formats (fieldgate.formats), each a pure function over one payload.

Payloads are built in the shapes each project's own documentation shows (the page is named
above each group), including the cases the issue lists as tricky, and a malformed corpus per
format. The validation that follows decoding (devices, time bounds, metric names) is
tested in test_inputs.py.
"""

from __future__ import annotations

import datetime as dt
import json
import typing

import pytest

from fieldgate.config import Format
from fieldgate.formats import (
    DECODERS,
    FORMAT_NAMES,
    CsvSpec,
    Options,
    SampleError,
    common,
    tasmota,
)
from fieldgate.formats.common import Decoded, datetime_ms, regex_datetime_ms, zone

UTC = Options()
BERLIN = Options(tz=zone("Europe/Berlin"))


def ms(text: str) -> int:
    """Epoch ms of an ISO 8601 date-time with a zone."""
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def decode(fmt: str, payload: str | dict | list, opts: Options = UTC, metric: str | None = None):
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return DECODERS[fmt](text, opts, metric)


def values(d: Decoded) -> list[list[tuple[str, float]]]:
    return [s.values for s in d.samples]


def test_every_contract_format_has_a_decoder_and_a_configuration_name() -> None:
    assert typing.get_args(Format) == FORMAT_NAMES
    assert set(FORMAT_NAMES) == {
        "fieldgate",
        "csv",
        "value",
        "json",
        "tasmota",
        "zigbee2mqtt",
        "shelly",
        "influx",
        "thingsboard",
    }


# ---- tasmota: tasmota.github.io/docs (AM2301, DS18x20 pages: tele/%topic%/SENSOR) -----------


def test_tasmota_sensor_message_with_time_and_temp_unit() -> None:
    d = decode(
        "tasmota",
        '{"Time":"2019-01-01T00:00:00","AM2301":{"Temperature":24.6,"Humidity":58.2},'
        '"TempUnit":"C"}',
    )
    (s,) = d.samples
    assert s.values == [("AM2301.Temperature", 24.6), ("AM2301.Humidity", 58.2)]
    assert s.ts == ms("2019-01-01T00:00:00+00:00")
    assert (d.skipped, d.skipped_shown) == (1, ['TempUnit: "C"'])


def test_tasmota_several_sensors_their_ids_and_fahrenheit() -> None:
    """Several DS18B20 on one device (each with its 1-Wire Id, a string) beside an AM2301;
    TempUnit F: the values are kept as the device sends them (the unit is its setting)."""
    payload = {
        "Time": "2021-01-02T09:09:44",
        "DS18B20-1": {"Id": "00000566CC39", "Temperature": 55.9},
        "DS18B20-2": {"Id": "000003287EF1", "Temperature": 56.3},
        "AM2301": {"Temperature": 76.3, "Humidity": 41.0, "DewPoint": 51.2},
        "TempUnit": "F",
    }
    d = decode("tasmota", payload, BERLIN)
    assert values(d) == [
        [
            ("DS18B20-1.Temperature", 55.9),
            ("DS18B20-2.Temperature", 56.3),
            ("AM2301.Temperature", 76.3),
            ("AM2301.Humidity", 41.0),
            ("AM2301.DewPoint", 51.2),
        ]
    ]
    # zone-less local time, read in the input's timezone (CET in January)
    assert d.samples[0].ts == ms("2021-01-02T09:09:44+01:00")
    assert d.skipped == 3  # two Ids and TempUnit


def test_tasmota_energy_and_switch_states() -> None:
    payload = {
        "Time": "2019-01-01T12:00:00+02:00",
        "Switch1": "ON",
        "Switch2": "off",
        "ENERGY": {
            "TotalStartTime": "2018-11-20T18:36:20",
            "Total": 2.137,
            "Yesterday": 0.0,
            "Today": 0.112,
            "Power": 14,
            "Voltage": 230,
        },
    }
    d = decode("tasmota", payload)
    assert values(d) == [
        [
            ("Switch1", 1.0),
            ("Switch2", 0.0),
            ("ENERGY.Total", 2.137),
            ("ENERGY.Yesterday", 0.0),
            ("ENERGY.Today", 0.112),
            ("ENERGY.Power", 14.0),
            ("ENERGY.Voltage", 230.0),
        ]
    ]
    assert d.samples[0].ts == ms("2019-01-01T12:00:00+02:00")  # a zone given wins
    assert d.skipped_shown == ['ENERGY.TotalStartTime: "2018-11-20T18:36:20"']


def test_tasmota_without_time_takes_the_arrival_stamp_and_ts_from_arrival_ignores_it() -> None:
    assert decode("tasmota", {"ANALOG": {"A0": 512}}).samples[0].ts is None
    d = decode(
        "tasmota",
        {"Time": "1970-01-01T00:00:48", "ANALOG": {"A0": 512}},
        Options(payload_time=False),
    )
    assert d.samples[0].ts is None
    assert values(d) == [[("ANALOG.A0", 512.0)]]


# ---- zigbee2mqtt: zigbee2mqtt.io (MQTT topics and messages; OTA updates; last_seen) --------


def test_zigbee2mqtt_device_state_with_nested_update_and_nulls() -> None:
    payload = {
        "battery": 100,
        "identify": None,
        "linkquality": 216,
        "update": {"installed_version": 33816598, "latest_version": 33816598, "state": "idle"},
        "update_available": False,
    }
    d = decode("zigbee2mqtt", payload)
    (s,) = d.samples
    assert s.ts is None
    assert s.values == [
        ("battery", 100.0),
        ("linkquality", 216.0),
        ("update.installed_version", 33816598.0),
        ("update.latest_version", 33816598.0),
        ("update_available", 0.0),
    ]
    assert d.skipped_shown == ["identify: null", 'update.state: "idle"']


def test_zigbee2mqtt_light_action_and_occupancy() -> None:
    assert values(decode("zigbee2mqtt", {"state": "ON", "brightness": 215, "color_temp": 325})) == [
        [("state", 1.0), ("brightness", 215.0), ("color_temp", 325.0)]
    ]
    assert values(decode("zigbee2mqtt", {"occupancy": True})) == [[("occupancy", 1.0)]]
    d = decode("zigbee2mqtt", {"action": "single"})
    assert values(d) == [[]] and d.skipped == 1
    d = decode("zigbee2mqtt", {"color": {"x": 0.123, "y": 0.123}, "keep_time": [30, 60]})
    assert values(d) == [[("color.x", 0.123), ("color.y", 0.123)]]
    assert d.skipped_shown == ["keep_time: [30, 60]"]


@pytest.mark.parametrize(
    ("last_seen", "expected"),
    [
        ("2019-10-23T08:23:35.000Z", ms("2019-10-23T08:23:35+00:00")),  # ISO_8601
        ("2019-10-23T10:23:35+02:00", ms("2019-10-23T08:23:35+00:00")),  # ISO_8601_local
        (1571819015123, 1571819015123),  # epoch (ms)
    ],
)
def test_zigbee2mqtt_last_seen_is_the_time(last_seen: object, expected: int) -> None:
    d = decode("zigbee2mqtt", {"temperature": 27.34, "humidity": 44.72, "last_seen": last_seen})
    assert d.samples[0].ts == expected
    assert values(d) == [[("temperature", 27.34), ("humidity", 44.72)]]


# ---- shelly: shelly-api-docs.shelly.cloud/gen2 (Notifications; a Plus H&T's status) ---------


def test_shelly_notify_status_switch() -> None:
    frame = {
        "src": "shellypro4pm-f008d1d8b8b8",
        "dst": "user_1",
        "method": "NotifyStatus",
        "params": {"ts": 1631186545.04, "switch:0": {"id": 0, "output": True, "source": "button"}},
    }
    d = decode("shelly", frame)
    assert values(d) == [[("switch:0.output", 1.0)]]
    assert d.samples[0].ts == 1631186545040
    assert d.skipped_shown == ['switch:0.source: "button"']


def test_shelly_full_status_temperature_component_and_nested_values() -> None:
    frame = {
        "src": "shellyplusht-b8d61a8b17cc",
        "dst": "shellyplusht-b8d61a8b17cc/events",
        "method": "NotifyFullStatus",
        "params": {
            "ts": 1680962879.62,
            "ble": {},
            "cloud": {"connected": False},
            "devicepower:0": {"id": 0, "battery": {"V": 0.43, "percent": 0}},
            "humidity:0": {"id": 0, "rh": 42.2},
            "sys": {"mac": "B8D61A8B17CC", "time": None, "uptime": 3, "available_updates": {}},
            "temperature:0": {"id": 0, "tC": 19.8, "tF": 67.6},
        },
    }
    d = decode("shelly", frame)
    assert values(d) == [
        [
            ("cloud.connected", 0.0),
            ("devicepower:0.battery.V", 0.43),
            ("devicepower:0.battery.percent", 0.0),
            ("humidity:0.rh", 42.2),
            ("sys.uptime", 3.0),
            ("temperature:0.tC", 19.8),
            ("temperature:0.tF", 67.6),
        ]
    ]
    assert d.samples[0].ts == 1680962879620
    assert d.skipped == 2  # sys.mac, sys.time: null


def test_shelly_key_that_disappeared_is_null_and_skipped() -> None:
    frame = {"method": "NotifyStatus", "params": {"ts": 1, "switch:0": {"id": 0, "timer": None}}}
    d = decode("shelly", frame)
    assert values(d) == [[]]
    assert d.skipped_shown == ["switch:0.timer: null"]


# ---- influx: docs.influxdata.com line protocol reference ------------------------------------


def test_influx_types_and_precision() -> None:
    text = (
        "weather,location=us-midwest temperature=82,humidity=71i,rain=t 1465839830100400200\n"
        'weather,location=us-midwest temperature=-1.234456e+78,pressure=12485903u,note="calm"'
    )
    d = decode("influx", text)
    assert values(d) == [
        [("weather.temperature", 82.0), ("weather.humidity", 71.0), ("weather.rain", 1.0)],
        [("weather.temperature", -1.234456e78), ("weather.pressure", 12485903.0)],
    ]
    assert [s.ts for s in d.samples] == [1465839830100, None]
    assert [s.label for s in d.samples] == ["line 1", "line 2"]
    assert d.skipped_shown == ['weather.note: "calm"']
    seconds = decode("influx", "m v=1 1465839830", Options(influx_precision="s"))
    assert seconds.samples[0].ts == 1465839830000


def test_influx_escaped_spaces_commas_equals_and_quotes() -> None:
    text = (
        r"my\ Measurement fieldKey=1" + "\n"
        r"my\,Measurement,tag\ Key1=tag\ Value1,tag\,2=a\=b field\ Key=2,f\,2=3" + "\n"
        r'myMeasurement fieldKey="\"string\" within a string",n=4' + "\n"
        r'myMeasurement,tagKey=🍭 fieldKey="Launch 🚀",s="a\\b, c d",x=5 1556813561098000000'
    )
    d = decode("influx", text)
    assert values(d) == [
        [("my Measurement.fieldKey", 1.0)],
        [("my,Measurement.field Key", 2.0), ("my,Measurement.f,2", 3.0)],
        [("myMeasurement.n", 4.0)],
        [("myMeasurement.x", 5.0)],
    ]
    assert d.skipped_shown[:2] == [
        'myMeasurement.fieldKey: "\\"string\\" within a string"',
        'myMeasurement.fieldKey: "Launch 🚀"',
    ]


@pytest.mark.parametrize("word", ["t", "T", "true", "True", "TRUE"])
def test_influx_booleans_true(word: str) -> None:
    assert values(decode("influx", f"m b={word}")) == [[("m.b", 1.0)]]


@pytest.mark.parametrize("word", ["f", "F", "false", "False", "FALSE"])
def test_influx_booleans_false(word: str) -> None:
    assert values(decode("influx", f"m b={word}")) == [[("m.b", 0.0)]]


def test_influx_comments_blank_lines_and_crlf() -> None:
    d = decode("influx", "# a comment\r\n\r\ncpu usage=0.5 1000000\r\n")
    assert values(d) == [[("cpu.usage", 0.5)]]
    assert d.samples[0].label == "line 3"


INFLUX_MALFORMED = [
    ("cpu", "no field set"),
    ("cpu usage", "expected key=value"),
    ("cpu usage=", "no value"),
    ("cpu usage=abc", 'field "usage": "abc" is not a line protocol value'),
    ("cpu usage=1.5i", "is not a line protocol value"),
    ("cpu usage=-1u", "is not a line protocol value"),
    ('cpu s="unterminated', "unterminated string"),
    ("cpu usage=1 12:00", 'timestamp "12:00" is not an integer'),
    ("cpu,host usage=1", 'tag "host": expected key=value'),
    ("cpu,host= usage=1", "empty value"),
    (",host=a usage=1", "no measurement"),
]


@pytest.mark.parametrize(("line", "reason"), INFLUX_MALFORMED)
def test_influx_malformed_lines_are_rejected_alone(line: str, reason: str) -> None:
    d = decode("influx", f"ok v=1\n{line}\nok v=2")
    assert [s.error is None for s in d.samples] == [True, False, True]
    assert reason in d.samples[1].error
    assert d.samples[1].label == "line 2"


def test_influx_payload_without_points() -> None:
    with pytest.raises(SampleError, match="no line protocol point"):
        decode("influx", "# only a comment\n\n")


# ---- thingsboard: thingsboard.io/docs/reference/mqtt-api (telemetry) ------------------------


def test_thingsboard_plain_key_values_take_the_arrival_stamp() -> None:
    d = decode("thingsboard", {"temperature": 22.5, "humidity": 61})
    assert values(d) == [[("temperature", 22.5), ("humidity", 61.0)]]
    assert d.samples[0].ts is None


def test_thingsboard_ts_and_values_and_a_list_of_them() -> None:
    d = decode(
        "thingsboard",
        [
            {"ts": 1451649600000, "values": {"temperature": 22.5, "humidity": 61}},
            {"ts": 1451649601000, "values": {"temperature": 22.7, "humidity": 60}},
        ],
    )
    assert values(d) == [
        [("temperature", 22.5), ("humidity", 61.0)],
        [("temperature", 22.7), ("humidity", 60.0)],
    ]
    assert [s.ts for s in d.samples] == [1451649600000, 1451649601000]
    assert [s.label for s in d.samples] == ["element 0", "element 1"]


def test_thingsboard_value_types_json_objects_and_arrays() -> None:
    d = decode(
        "thingsboard",
        {
            "key1": "value1",
            "key2": True,
            "key3": 3.0,
            "key4": 4,
            "key5": {"someNumber": 42, "someArray": [1, 2, 3], "someNestedObject": {"key": "v"}},
        },
    )
    assert values(d) == [[("key2", 1.0), ("key3", 3.0), ("key4", 4.0), ("key5.someNumber", 42.0)]]
    assert d.skipped == 3


# ---- value (ESPHome: esphome.io, <prefix>/<component type>/<object id>/state) -------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("21.5", 21.5),
        ("-3", -3.0),
        ("1e3", 1000.0),
        ("ON", 1.0),
        ("OFF", 0.0),
        ("true", 1.0),
        (" 42 \n", 42.0),
    ],
)
def test_value_payloads(payload: str, expected: float) -> None:
    d = decode("value", payload, metric="temperature")
    assert values(d) == [[("temperature", expected)]]
    assert d.samples[0].ts is None


@pytest.mark.parametrize("payload", ["nan", "unavailable", "", "1_000", "0x10", "inf", "21,5"])
def test_value_that_is_no_reading_is_skipped(payload: str) -> None:
    d = decode("value", payload, metric="temperature")
    assert d.samples == [] and d.skipped == 1


# ---- csv (ISEMS csvlog lines, github.com/ISEMS: nodeid;packetrev;timestamp;…) ---------------

ISEMS = CsvSpec(
    delimiter=";",
    columns=("device", "-", "ts", "-", "time_to_shutdown", "power_save", "open_circuit_voltage"),
    ts_unit="s",
)
ISEMS_LINE = (
    "{node};1;{ts};FF-ESP32-1A;3600;0;20.1;17.3;13.2;95;100;21.5;11.9;14.6;7.2;10;52.5;13.4;0C0"
)


def test_csv_isems_log_lines_several_per_payload() -> None:
    text = "\n".join(ISEMS_LINE.format(node="isems-7", ts=1767225600 + 60 * i) for i in range(5))
    d = decode("csv", text, Options(csv=ISEMS))
    assert len(d.samples) == 5
    assert d.samples[0].values == [
        ("time_to_shutdown", 3600.0),
        ("power_save", 0.0),
        ("open_circuit_voltage", 20.1),
    ]
    assert [s.ts for s in d.samples] == [1767225600000 + 60000 * i for i in range(5)]
    assert {s.device for s in d.samples} == {"isems-7"}
    assert [s.label for s in d.samples] == [f"line {i}" for i in range(1, 6)]


def test_csv_quoted_fields_rfc4180() -> None:
    spec = CsvSpec(delimiter=";", columns=("ts", "-", "a", "b"))
    text = '1767225600000;"note; with ""quotes""";1.5;"2"\n1767225601000;"two\nlines";3;4\n'
    d = decode("csv", text, Options(csv=spec))
    assert values(d) == [[("a", 1.5), ("b", 2.0)], [("a", 3.0), ("b", 4.0)]]
    assert [s.label for s in d.samples] == ["line 1", "line 2"]


def test_csv_header_date_times_and_skipped_fields() -> None:
    spec = CsvSpec(columns=("ts", "temperature", "state"), header=True)
    text = "time,temperature,state\n2026-01-01T01:00:00,21.5,ON\n2026-01-01T01:01:00,,n/a\n"
    d = decode("csv", text, Options(csv=spec, tz=zone("Europe/Berlin")))
    assert values(d) == [[("temperature", 21.5), ("state", 1.0)], []]
    assert d.samples[0].ts == ms("2026-01-01T00:00:00+00:00")
    assert d.skipped_shown == ['temperature: ""', 'state: "n/a"']


def test_csv_without_ts_column_and_with_units() -> None:
    d = decode("csv", "21.5", Options(csv=CsvSpec(columns=("temperature",))))
    assert d.samples[0].ts is None
    for unit, raw, expected in (
        ("us", "1767225600123456", 1767225600123),
        ("ns", "1767225600123456789", 1767225600123),
        ("s", "1680962879.62", 1680962879620),
    ):
        spec = CsvSpec(columns=("ts", "v"), ts_unit=unit)
        assert decode("csv", f"{raw},1", Options(csv=spec)).samples[0].ts == expected


CSV_MALFORMED = [
    ("1767225600000;1", "2 fields, expected 3"),
    (";1;2", "ts: empty field"),
    ("yesterday;1;2", "is not a date-time"),
    ('1767225600000;"unterminated;2', "bad CSV"),
]


@pytest.mark.parametrize(("line", "reason"), CSV_MALFORMED)
def test_csv_malformed_lines(line: str, reason: str) -> None:
    spec = CsvSpec(delimiter=";", columns=("ts", "a", "b"))
    d = decode("csv", f"1767225600000;1;2\n{line}\n", Options(csv=spec))
    assert d.samples[0].error is None
    assert reason in d.samples[1].error
    assert d.samples[1].label == "line 2"


def test_csv_empty_payload() -> None:
    with pytest.raises(SampleError, match="no data line"):
        decode("csv", "\n\n", Options(csv=CsvSpec(columns=("a",))))


# ---- json (generic) ------------------------------------------------------------------------


def test_json_ts_path_and_metrics_path() -> None:
    opts = Options(ts_path="meta.time", metrics_path="data", ts_unit="s")
    doc = {"meta": {"time": 1767225600, "fw": "1.2"}, "data": {"t": 1.5, "pump": {"on": True}}}
    d = decode("json", doc, opts)
    assert values(d) == [[("t", 1.5), ("pump.on", 1.0)]]
    assert d.samples[0].ts == 1767225600000


def test_json_without_metrics_path_leaves_the_time_out() -> None:
    d = decode("json", [{"time": "2026-01-01T00:00:00Z", "t": 1}], Options(ts_path="time"))
    assert values(d) == [[("t", 1.0)]] and d.skipped == 0
    assert d.samples[0].ts == ms("2026-01-01T00:00:00+00:00")
    assert d.samples[0].label == "element 0"


def test_json_without_ts_path_takes_the_arrival_stamp_and_metric_level_prefixes() -> None:
    d = decode("json", {"a": {"b": 2}}, metric="pump")
    assert values(d) == [[("pump.a.b", 2.0)]] and d.samples[0].ts is None


JSON_MALFORMED = [
    ({"t": 1}, "meta.time (ts_path): missing"),
    ({"meta": {"time": "later"}, "data": {}}, "is not a date-time"),
    ({"meta": {"time": 1}, "data": 5}, "data (metrics_path): expected an object"),
    ({"meta": {"time": 1}}, "data (metrics_path): missing"),
    ({"meta": {"time": True}, "data": {}}, "expected epoch ms or a date-time"),
]


@pytest.mark.parametrize(("doc", "reason"), JSON_MALFORMED)
def test_json_malformed(doc: object, reason: str) -> None:
    d = decode("json", doc, Options(ts_path="meta.time", metrics_path="data"))
    (s,) = d.samples
    assert reason in s.error


# ---- what every JSON format refuses ----------------------------------------------------------

JSON_FORMATS = ["json", "tasmota", "zigbee2mqtt", "shelly", "thingsboard"]


@pytest.mark.parametrize("fmt", JSON_FORMATS)
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("{not json", "bad JSON: Expecting property name enclosed in double quotes"),
        ('{"t": NaN}', "bad JSON: NaN is not allowed in JSON"),
        ("[" * 100_000 + "]" * 100_000, "bad JSON: nested too deeply"),
        ('"a string"', "got a string"),
        ("42", "got a number"),
    ],
)
def test_json_formats_refuse_what_is_not_their_json(fmt: str, payload: str, reason: str) -> None:
    with pytest.raises(SampleError) as caught:
        decode(fmt, payload)
    assert reason in str(caught.value)


def test_shelly_other_methods_and_missing_params() -> None:
    with pytest.raises(SampleError, match='method "NotifyEvent" is not a status notification'):
        decode("shelly", {"method": "NotifyEvent", "params": {"ts": 1, "events": []}})
    with pytest.raises(SampleError, match="params: expected an object"):
        decode("shelly", {"method": "NotifyStatus"})
    with pytest.raises(SampleError, match=r'params\.ts: "soon" is not a date-time'):
        decode("shelly", {"method": "NotifyStatus", "params": {"ts": "soon"}})


def test_tasmota_bad_time_rejects_its_sample() -> None:
    d = decode("tasmota", {"Time": "2019-13-01T00:00:00", "A": 1})
    assert "Time:" in d.samples[0].error and "not a valid date-time" in d.samples[0].error


# ---- times ---------------------------------------------------------------------------------


def test_zone_less_local_times_across_a_daylight_saving_change() -> None:
    berlin = zone("Europe/Berlin")
    assert datetime_ms("2026-03-29T01:59:59", berlin, "t") == ms("2026-03-29T00:59:59+00:00")
    assert datetime_ms("2026-03-29T03:00:00", berlin, "t") == ms("2026-03-29T01:00:00+00:00")
    # the repeated hour in October: the first of the two
    assert datetime_ms("2026-10-25T02:30:00", berlin, "t") == ms("2026-10-25T00:30:00+00:00")
    assert (
        datetime_ms("2026-01-01 00:00:00.5Z", berlin, "t") == ms("2026-01-01T00:00:00+00:00") + 500
    )


def read_time(text: str, tz: dt.tzinfo) -> int | str:
    try:
        return datetime_ms(text, tz, "t")
    except SampleError as exc:
        return str(exc)


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/St_Johns"])
def test_a_time_of_a_minute_already_read_is_read_as_without_it(tz: str) -> None:
    zone_ = zone(tz)
    seconds = [f"{i:02d}" for i in range(60)] + ["60", "99", "5a", "\u0663\u0663", "1 "]
    for minute in ("2026-01-01T00:00", "2026-03-29 02:30", "2026-10-25T02:59", "2024-02-29T23:59"):
        for ss in seconds:
            text = f"{minute}:{ss}"
            common._MINUTES.clear()
            fresh = read_time(text, zone_)
            assert read_time(f"{minute}:00", zone_) == read_time(f"{minute}:00", zone_)
            assert read_time(text, zone_) == fresh, text
    assert read_time("2026-03-29T02:30:15", zone("Europe/Berlin")) == ms("2026-03-29T01:30:15Z")


def slow_time(text: str, tz: dt.tzinfo) -> int | str:
    """A payload's ``Time`` read by the regular expression alone (as ``time_ms``: stripped)."""
    try:
        return regex_datetime_ms(text.strip(), tz, "Time")
    except SampleError as exc:
        return str(exc)


def tasmota_time(text: str, tz: dt.tzinfo) -> int | str | None:
    """The time Tasmota's one reader gives a payload's ``Time`` (or its reason)."""
    try:
        return tasmota.read(json.dumps({"Time": text, "A": 1}), Options(tz=tz), None, [], [])
    except SampleError as exc:
        return str(exc)


#: Local minutes whose seconds the fast path reads: a leap day, a year's end, the epoch,
#: Berlin's daylight saving gap (02:30 does not exist) and repeated hour, St John's
#: half-hour zone's gap.
MINUTES = (
    "2024-02-29T23:59",
    "2026-12-31 23:59",
    "1970-01-01T00:00",
    "2026-03-29T02:30",
    "2026-03-29T01:59",
    "2026-10-25T02:00",
    "2026-03-08T02:30",
    "2026-01-01t00:00",
)
#: What follows a minute: every second, a leap second, nonsense, non-ASCII digits (Arabic-
#: Indic, fullwidth), spaces, a sign, a fraction and zones.
SECONDS = (
    *(f"{i:02d}" for i in range(60)),
    *("60", "61", "99", "5a", "-1", "+5", " 5", "5 ", "\u0663\u0663", "\uff11\uff12", "1"),
    *("00.5", "00,25", "00Z", "00+01:00", "00 ", "000", "0\u0660"),
)


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/St_Johns"])
def test_the_fast_time_is_the_regular_expressions_time(tz: str) -> None:
    """The fixed-layout fast path (``fromisoformat``, the minute cache, the seconds table)
    gives what the regular expression gives for every text of a cached minute and of one
    not yet read, as ``datetime_ms`` and as Tasmota's reader reads a payload's ``Time``."""
    zone_ = zone(tz)
    for minute in MINUTES:
        for ss in SECONDS:
            text = f"{minute}:{ss}"
            slow = slow_time(text, zone_)
            for warm in (False, True):
                common._MINUTES.clear()
                if warm:  # the minute is in the cache, as after a device's first message
                    datetime_ms(f"{minute}:00", zone_, "t")
                fast = common._fast_datetime_ms(text, zone_)
                assert fast is None or fast == slow, (text, warm)
                assert tasmota_time(text, zone_) == slow, (text, warm)


def test_unknown_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        zone("Mars/Olympus")


THINGSBOARD_MALFORMED = [
    ([1, {"t": 1}], "expected an object, got a number"),
    ([{"ts": "soon", "values": {"t": 1}}, {"t": 1}], 'ts: "soon" is not a date-time'),
    ([{"ts": 1451649600512, "values": [1, 2]}, {"t": 1}], "values: expected an object"),
    ([{"ts": True, "values": {"t": 1}}, {"t": 1}], "ts: expected epoch ms or a date-time"),
]


@pytest.mark.parametrize(("doc", "reason"), THINGSBOARD_MALFORMED)
def test_thingsboard_malformed_samples_are_rejected_alone(doc: list, reason: str) -> None:
    d = decode("thingsboard", doc)
    assert reason in d.samples[0].error
    assert d.samples[0].label == "element 0"
    assert values(d)[1] == [("t", 1.0)]


def test_value_input_payload_is_text_not_json() -> None:
    assert decode("value", '"21.5"', metric="t").samples == []  # a JSON string is no number
