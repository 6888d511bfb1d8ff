"""Which devices share a bus (and so take turns): units behind one TCP endpoint, and every
name of one serial port; when the buses' round is complete (one commit stores it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fieldgate.config import parse_config
from fieldgate.errors import ConfigError
from fieldgate.modbus.poller import Handoff, Polled, build_targets, group_buses

REG = [{"metric": "x", "address": 0, "table": "holding", "type": "uint16"}]


def config(*devices: dict[str, Any]) -> Any:
    return parse_config(
        {
            "site": {"serial": "GW"},
            "devices": {"allow_unknown": True},
            "poll": {
                "interval_secs": 10,
                "timeout_secs": 2,
                "modbus": [{"registers": REG, **d} for d in devices],
            },
        },
        "/etc/fieldgate/fieldgate.yaml",
    )


def test_buses_by_endpoint_and_resolved_serial_port(tmp_path: Path) -> None:
    tty = tmp_path / "ttyUSB0"
    tty.touch()
    by_id = tmp_path / "usb-FTDI-if00-port0"
    by_id.symlink_to(tty)
    cfg = config(
        {"device": "A", "host": "10.0.0.1", "unit": 1},
        {"device": "B", "host": "10.0.0.1", "unit": 2},
        {"device": "C", "host": "10.0.0.1", "port": 5020, "unit": 1},
        {"device": "D", "serial": str(tty), "unit": 1},
        {"device": "E", "serial": str(by_id), "unit": 2, "interval_secs": 1, "timeout_secs": 0.2},
    )
    targets = build_targets(cfg)
    buses = group_buses(targets, cfg.path)
    assert {bus: [t.device for t in ts] for bus, ts in buses.items()} == {
        "tcp 10.0.0.1:502": ["A", "B"],
        "tcp 10.0.0.1:5020": ["C"],
        f"rtu {tty}": ["D", "E"],
    }
    e = targets[-1]
    assert (e.interval, e.timeout) == (1, 0.2)
    assert (targets[0].interval, targets[0].timeout) == (10, 2)
    assert e.where == f"rtu {by_id} unit 2"
    assert e.source == "modbus:E"


def test_two_names_of_one_port_must_agree(tmp_path: Path) -> None:
    tty = tmp_path / "ttyUSB0"
    tty.touch()
    link = tmp_path / "meter-line"
    link.symlink_to(tty)
    cfg = config(
        {"device": "D", "serial": str(tty), "unit": 1, "baudrate": 9600},
        {"device": "E", "serial": str(link), "unit": 1, "baudrate": 9600},
    )
    with pytest.raises(ConfigError, match=r"E and D are both unit 1 on rtu "):
        group_buses(build_targets(cfg), cfg.path)
    cfg = config(
        {"device": "D", "serial": str(tty), "unit": 1, "baudrate": 9600},
        {"device": "E", "serial": str(link), "unit": 2},
    )
    with pytest.raises(ConfigError, match="are the same serial port with different line settings"):
        group_buses(build_targets(cfg), cfg.path)


def test_a_round_is_complete_when_no_bus_polls_or_is_due() -> None:
    (target,) = build_targets(config({"device": "A", "host": "10.0.0.1"}))
    handoff = Handoff(2)
    now = time.monotonic()
    first, second, third = Polled(target, 1), Polled(target, 2), Polled(target, 3)
    handoff.put(first, "a", now + 10)
    assert handoff.take(0) == ([first], [], False)  # bus b has not reported yet
    handoff.put(second, "b", now + 10)
    assert handoff.take(0) == ([second], [], True)  # both idle until their next turn
    handoff.polling("a")
    assert handoff.take(0) == ([], [], False)  # a polls again
    handoff.progress(third)  # its first answers are in: stored while a reads on
    assert handoff.take(0) == ([], [third], False)
    handoff.put(third, "a", now - 1)  # a's next device is due already: it polls on
    assert handoff.take(0) == ([third], [], False)
