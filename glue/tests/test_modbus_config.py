"""``poll.modbus`` validation: every mistake is one line naming the key and the file."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from support import ConfigFactory, run_fieldgate

from fieldgate.config import parse_config
from fieldgate.errors import ConfigError

PATH = "/etc/fieldgate/fieldgate.yaml"


def base(**device: Any) -> dict[str, Any]:
    """A valid configuration with one Modbus TCP device; ``device`` keys override."""
    dev: dict[str, Any] = {
        "device": "MTR-1",
        "host": "192.0.2.20",
        "unit": 1,
        "registers": [
            {"metric": "voltage", "address": 0, "table": "input", "type": "float32"},
            {"metric": "power", "address": 52, "table": "input", "type": "float32"},
            {"metric": "relay", "address": 3, "table": "coil"},
        ],
    }
    dev.update(device)
    return {
        "site": {"serial": "GW-1"},
        "devices": {"list": [{"serial": "MTR-1", "alias": "meter"}, {"serial": "MTR-2"}]},
        "poll": {"modbus": [dev]},
    }


def reg(i: int, **over: Any) -> dict[str, Any]:
    """A configuration whose first device's register ``i`` has ``over`` applied."""
    data = base()
    data["poll"]["modbus"][0]["registers"][i].update(over)
    return data


def with_registers(*regs: dict[str, Any]) -> dict[str, Any]:
    return base(registers=list(regs))


def two(second: dict[str, Any], first: dict[str, Any] | None = None) -> dict[str, Any]:
    """Two devices: MTR-1 (``first`` overrides) and MTR-2 (``second``)."""
    data = base(**(first or {}))
    dev = copy.deepcopy(data["poll"]["modbus"][0])
    dev.update({"device": "MTR-2", **second})
    data["poll"]["modbus"].append(dev)
    return data


RTU = {"host": None, "serial": "/dev/ttyUSB0"}


def test_a_valid_map_gets_its_defaults() -> None:
    cfg = parse_config(base(), PATH)
    (dev,) = cfg.poll.modbus
    assert dev.tcp and dev.port_or_default == 502 and dev.bus == "tcp 192.0.2.20:502"
    assert dev.interval_secs is None and dev.timeout_secs is None  # poll.* apply
    assert (dev.max_gap, dev.max_read_registers, dev.max_read_bits) == (10, 125, 2000)
    voltage, _, relay = dev.registers
    assert (voltage.word_order, voltage.scale, voltage.offset) == ("big", 1.0, 0.0)
    assert relay.type is None  # read as bool


def test_rtu_defaults_are_the_serial_line_specs() -> None:
    data = base(**RTU)
    del data["poll"]["modbus"][0]["host"]
    dev = parse_config(data, PATH).poll.modbus[0]
    assert not dev.tcp and dev.bus == "rtu /dev/ttyUSB0"
    assert dev.line == (19200, "E", 1, 8)


def test_alias_and_allow_unknown() -> None:
    parse_config(base(device="meter"), PATH)
    data = base(device="NOT-LISTED")
    data["devices"]["allow_unknown"] = True
    parse_config(data, PATH)


def rtu(**over: Any) -> dict[str, Any]:
    data = base(**{"serial": "/dev/ttyUSB0", **over})
    del data["poll"]["modbus"][0]["host"]
    return data


BAD: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown device",
        base(device="INV-9"),
        "poll.modbus[0].device: 'INV-9' is not in devices.list",
    ),
    ("bad device name", base(device="a/b"), "poll.modbus[0].device: 'a/b' is not a valid value"),
    (
        "the same device twice",
        two({"device": "meter", "host": "192.0.2.21"}),
        "poll.modbus[1].device: 'meter' is already polled by poll.modbus[0]",
    ),
    (
        "neither host nor serial",
        base(host=None),
        "poll.modbus[0]: give either host (Modbus TCP) or serial (Modbus RTU)",
    ),
    (
        "host and serial",
        base(serial="/dev/ttyUSB0"),
        "poll.modbus[0]: give either host (Modbus TCP) or serial (Modbus RTU), not both",
    ),
    ("bad host", base(host="bad host"), "poll.modbus[0].host: 'bad host' is not a valid value"),
    ("port out of range", base(port=70000), "poll.modbus[0].port: must be at most 65535"),
    ("port on rtu", rtu(port=502), "poll.modbus[0].port: only for Modbus TCP (host), not serial"),
    (
        "serial settings on tcp",
        base(baudrate=9600),
        "poll.modbus[0].baudrate: only for Modbus RTU (serial), not host",
    ),
    ("relative serial path", rtu(serial="ttyUSB0"), "poll.modbus[0].serial: 'ttyUSB0' is not"),
    ("parity", rtu(parity="X"), "poll.modbus[0].parity: must be one of N, E, O, got string 'X'"),
    ("parity lower case", rtu(parity="e"), "poll.modbus[0].parity: must be one of N, E, O"),
    ("stopbits", rtu(stopbits=3), "poll.modbus[0].stopbits: must be at most 2, got 3"),
    ("stopbits bool", rtu(stopbits=True), "poll.modbus[0].stopbits: expected an integer"),
    (
        "bytesize",
        rtu(bytesize=7),
        "poll.modbus[0].bytesize: Modbus RTU frames need 8 data bits, got 7",
    ),
    ("baudrate zero", rtu(baudrate=0), "poll.modbus[0].baudrate: must be at least 300, got 0"),
    ("baudrate text", rtu(baudrate="fast"), "poll.modbus[0].baudrate: expected an integer"),
    (
        "rtu broadcast unit",
        rtu(unit=0),
        "poll.modbus[0].unit: a Modbus RTU unit is 1 to 247 (0 is broadcast), got 0",
    ),
    ("tcp unit out of range", base(unit=256), "poll.modbus[0].unit: must be at most 255"),
    (
        "two devices on one serial port disagree on the line",
        two(
            {"serial": "/dev/ttyUSB0", "host": None, "unit": 2, "baudrate": None},
            {**RTU, "baudrate": 9600},
        ),
        "poll.modbus[1]: serial line 19200 8E1 differs from 9600 8E1 of poll.modbus[0] "
        "on the same port /dev/ttyUSB0",
    ),
    (
        "the same unit twice on one bus",
        two({}),
        "poll.modbus[1].unit: unit 1 on tcp 192.0.2.20:502 is already poll.modbus[0]",
    ),
    ("interval too short", base(interval_secs=0), "poll.modbus[0].interval_secs: must be at least"),
    ("timeout text", base(timeout_secs="2s"), "poll.modbus[0].timeout_secs: expected a number"),
    ("max_read_registers", base(max_read_registers=126), "poll.modbus[0].max_read_registers: must"),
    ("max_gap", base(max_gap=-1), "poll.modbus[0].max_gap: must be at least 0"),
    ("unknown device key", base(slave=1), "poll.modbus[0].slave: unknown key"),
    ("no registers", base(registers=[]), "poll.modbus[0].registers: empty: a Modbus device"),
    ("registers missing", base(registers=None), "poll.modbus[0].registers: expected a list"),
    ("unknown register key", reg(0, bit=3), "poll.modbus[0].registers[0].bit: unknown key"),
    ("no metric", reg(0, metric=None), "poll.modbus[0].registers[0].metric: expected a string"),
    ("bad metric", reg(0, metric="a b"), "poll.modbus[0].registers[0].metric: 'a b' is not"),
    (
        "duplicate metric",
        reg(1, metric="voltage"),
        "poll.modbus[0].registers[1].metric: 'voltage' is already registers[0]",
    ),
    ("negative address", reg(0, address=-1), "poll.modbus[0].registers[0].address: must be at"),
    ("address too big", reg(0, address=65536), "poll.modbus[0].registers[0].address: must be at"),
    (
        "a wide type past the last address",
        reg(0, address=65534, type="float64"),
        "poll.modbus[0].registers[0].address: float64 at 65534 spans 65534-65537, past the last "
        "address 65535",
    ),
    ("bad table", reg(0, table="holdings"), "poll.modbus[0].registers[0].table: must be one of"),
    ("bad type", reg(0, type="float"), "poll.modbus[0].registers[0].type: must be one of"),
    (
        "register without a type",
        reg(0, type=None),
        "poll.modbus[0].registers[0].type: required for holding and input registers (int16, uint16",
    ),
    (
        "a number on a coil",
        reg(2, type="uint16"),
        "poll.modbus[0].registers[2].type: a coil is a single bit: only bool fits, got uint16",
    ),
    (
        "a number on a discrete input",
        reg(2, table="discrete", type="float32"),
        "poll.modbus[0].registers[2].type: a discrete input is a single bit: only bool fits",
    ),
    ("bad word order", reg(0, word_order="middle"), "registers[0].word_order: must be one of"),
    (
        "overlap of different types",
        with_registers(
            {"metric": "a", "address": 10, "table": "holding", "type": "int32"},
            {"metric": "b", "address": 11, "table": "holding", "type": "uint16"},
        ),
        "poll.modbus[0].registers[1].address: holding 11 (uint16) overlaps registers[0] "
        "(holding 10-11, int32); overlapping registers must be the same value read the same way",
    ),
    (
        "overlap of one type at different addresses",
        with_registers(
            {"metric": "a", "address": 10, "table": "holding", "type": "float64"},
            {"metric": "b", "address": 12, "table": "holding", "type": "float64"},
        ),
        "poll.modbus[0].registers[1].address: holding 12-15 (float64) overlaps registers[0]",
    ),
    (
        "overlap with another word order",
        with_registers(
            {"metric": "a", "address": 10, "table": "input", "type": "float32"},
            {
                "metric": "b",
                "address": 10,
                "table": "input",
                "type": "float32",
                "word_order": "little",
            },
        ),
        "poll.modbus[0].registers[1].address: input 10-11 (float32) overlaps registers[0]",
    ),
    (
        "a value wider than the device reads at once",
        base(
            max_read_registers=2,
            registers=[{"metric": "e", "address": 0, "table": "holding", "type": "uint64"}],
        ),
        "poll.modbus[0].registers[0].type: uint64 spans 4 registers, more than "
        "max_read_registers (2) allows in one read",
    ),
    ("scale zero", reg(0, scale=0), "poll.modbus[0].registers[0].scale: must not be 0"),
    ("scale nan", reg(0, scale=float("nan")), "registers[0].scale: must be a finite number"),
    ("offset inf", reg(0, offset=float("inf")), "registers[0].offset: must be a finite number"),
    ("scale text", reg(0, scale="0.1"), "poll.modbus[0].registers[0].scale: expected a number"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD], ids=[n for n, *_ in BAD])
def test_bad_modbus_config_is_one_clear_error(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, PATH)
    text = str(err.value)
    assert text.startswith(f"{PATH}: "), text
    assert message in text, text
    assert "\n" not in text


def test_overlaps_that_read_one_value_twice_are_fine() -> None:
    cfg = parse_config(
        with_registers(
            {"metric": "raw", "address": 10, "table": "holding", "type": "int32"},
            {"metric": "scaled", "address": 10, "table": "holding", "type": "int32", "scale": 0.1},
            {
                "metric": "same_address_other_table",
                "address": 10,
                "table": "input",
                "type": "int16",
            },
            {"metric": "flag", "address": 12, "table": "holding", "type": "bool"},
            {"metric": "c1", "address": 10, "table": "coil"},
            {"metric": "c2", "address": 10, "table": "coil", "type": "bool"},
        ),
        PATH,
    )
    assert len(cfg.poll.modbus[0].registers) == 6


def test_two_devices_share_a_serial_port_and_a_tcp_gateway() -> None:
    parse_config(two({"serial": "/dev/ttyUSB0", "host": None, "unit": 2}, RTU), PATH)
    parse_config(two({"unit": 2}), PATH)


def test_check_config_exits_2_with_one_line(config_file: ConfigFactory) -> None:
    config = config_file(
        overrides={
            "poll": {
                "modbus": [
                    {
                        "device": "TH-001",
                        "host": "127.0.0.1",
                        "registers": [
                            {"metric": "a", "address": 0, "table": "coil", "type": "int16"}
                        ],
                    }
                ]
            }
        }
    )
    r = run_fieldgate("check-config", config=config)
    assert r.returncode == 2, r
    assert r.stderr == (
        f"fieldgate: error: {config}: poll.modbus[0].registers[0].type: a coil is a single bit: "
        "only bool fits, got int16\n"
    )
