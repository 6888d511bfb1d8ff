"""``fieldgate poll`` against real Modbus peers: pymodbus's own TCP server on loopback and its
RTU server at the far end of a socat pty pair; failing devices beside healthy ones."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import signal
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from modbus_sim import (
    Memory,
    Simulator,
    as_stored,
    corrupt_crc,
    device_failure,
    never_answer,
    no_input_registers,
    poll_tcp_once,
    pty_pair,
    simulator,
    words,
)
from support import (
    ConfigFactory,
    count_rows,
    free_port,
    run_fieldgate,
    start_fieldgate,
    stop_process,
    wait_until,
)

from fieldgate.config import load_config, parse_config
from fieldgate.modbus.plan import Read
from fieldgate.modbus.poller import build_targets

TYPES = ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
SAMPLE = {
    "int16": -12345,
    "uint16": 54321,
    "int32": -2_000_000_001,
    "uint32": 4_000_000_001,
    "int64": -(2**53) + 7,
    "uint64": 2**53 - 3,
    "float32": 230.25,
    "float64": -1234.5678901234,
}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with simulator() as s:
        yield s


def db_of(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["store"]["path"])


def rows(db: Path, where: str = "1") -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute(
            f"SELECT device, ts, metric, value, source FROM readings WHERE {where} "  # noqa: S608
            "ORDER BY ts, metric"
        ).fetchall()
    finally:
        conn.close()


def modbus_config(
    config_file: ConfigFactory, devices: list[dict[str, Any]], **overrides: Any
) -> Path:
    listed = [{"serial": d["device"]} for d in devices]
    return config_file(
        overrides={
            "devices": {"list": listed},
            "poll": {"interval_secs": 1, "timeout_secs": 1, "modbus": devices},
            **overrides,
        }
    )


def every_type_map() -> tuple[Memory, list[dict[str, Any]], dict[str, float]]:
    """A unit holding each type in both word orders (holding and input tables), with scale
    and offset, 2 coils, 2 discrete inputs and 2 bools on registers; and the expected values."""
    mem = Memory()
    regs: list[dict[str, Any]] = []
    expected: dict[str, float] = {}
    address = 0
    for table in ("holding", "input"):
        address = 0
        for type_ in TYPES:
            for order in ("big", "little"):
                value = SAMPLE[type_]
                mem.put(table, address, words(type_, value, order))
                metric = f"{table}_{type_}_{order}"
                regs.append(
                    {
                        "metric": metric,
                        "address": address,
                        "table": table,
                        "type": type_,
                        "word_order": order,
                    }
                )
                expected[metric] = as_stored(type_, value)
                address += len(words(type_, value))
    # scale and offset: a temperature sent as tenths of a degree, minus 40
    mem.put("holding", 100, words("int16", 215))
    regs.append(
        {
            "metric": "temp",
            "address": 100,
            "table": "holding",
            "type": "int16",
            "scale": 0.1,
            "offset": -40,
        }
    )
    expected["temp"] = 215 * 0.1 - 40
    mem.put("holding", 101, [0])
    mem.put("holding", 102, [0x8000])
    regs += [
        {"metric": "flag_off", "address": 101, "table": "holding", "type": "bool"},
        {"metric": "flag_on", "address": 102, "table": "holding", "type": "bool"},
    ]
    expected |= {"flag_off": 0.0, "flag_on": 1.0}
    mem.coils |= {5: True, 37: False, 38: True}
    mem.discrete |= {0: False, 1999: True}
    regs += [
        {"metric": "relay", "address": 5, "table": "coil"},
        {"metric": "relay_off", "address": 37, "table": "coil", "type": "bool"},
        {"metric": "door_closed", "address": 0, "table": "discrete"},
        {"metric": "alarm", "address": 1999, "table": "discrete"},
    ]
    expected |= {"relay": 1.0, "relay_off": 0.0, "door_closed": 0.0, "alarm": 1.0}
    return mem, regs, expected


def status_json(config: Path) -> dict[str, Any]:
    r = run_fieldgate("status", "--json", config=config)
    assert r.returncode == 0, r
    return json.loads(r.stdout)


def test_tcp_every_type_and_word_order_is_decoded(
    config_file: ConfigFactory, sim: Simulator
) -> None:
    mem, regs, expected = every_type_map()
    port = free_port()
    sim.tcp(port, [mem.device(7)])
    config = modbus_config(
        config_file,
        [{"device": "MTR-1", "host": "127.0.0.1", "port": port, "unit": 7, "registers": regs}],
    )
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 0, r
    db = db_of(config)
    got = rows(db)
    assert len(got) == len(expected)
    (ts,) = {row[1] for row in got}  # one poll time for the whole map
    assert abs(ts - time.time() * 1000) < 60_000
    assert {row[0] for row in got} == {"MTR-1"}
    assert {row[4] for row in got} == {"modbus:MTR-1"}
    values = {metric: value for _, _, metric, value, _ in got}
    for metric, want in expected.items():
        assert values[metric] == pytest.approx(want, rel=1e-12, abs=1e-12), metric
    # coalesced with max_gap 10: holding 0-39 and 100-102, input 0-39, coils 5 and 37-38,
    # discrete inputs 0 and 1999: 7 requests for 40 values
    device = status_json(config)["modbus"]["devices"][0]
    assert device["requests"] == 7, device
    assert device["state"] == "ok" and device["polls"] == 1 and device["failures"] == 0
    assert sim.requests == 7

    # a second poll adds a second set of readings with its own time, nothing twice
    time.sleep(0.01)
    assert run_fieldgate("poll", "--once", config=config).returncode == 0
    again = rows(db)
    assert len(again) == 2 * len(expected)
    assert len({row[1] for row in again}) == 2
    assert len(set(again)) == len(again)


def test_non_finite_values_are_rejected_and_the_rest_stored(
    config_file: ConfigFactory, sim: Simulator
) -> None:
    mem = Memory()
    mem.put("input", 0, words("float32", 50.0))
    mem.put("input", 2, [0x7FC0, 0x0000])  # NaN, as meters send for "not available"
    mem.put("input", 4, words("float64", math.inf))
    port = free_port()
    sim.tcp(port, [mem.device(1)])
    config = modbus_config(
        config_file,
        [
            {
                "device": "MTR-1",
                "host": "127.0.0.1",
                "port": port,
                "registers": [
                    {"metric": "frequency", "address": 0, "table": "input", "type": "float32"},
                    {"metric": "thd", "address": 2, "table": "input", "type": "float32"},
                    {"metric": "energy", "address": 4, "table": "input", "type": "float64"},
                ],
            }
        ],
    )
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 0, r  # the device answered: partly rejected is not a failure
    db = db_of(config)
    assert [(m, v) for _, _, m, v, _ in rows(db)] == [("frequency", 50.0)]
    conn = sqlite3.connect(str(db))
    (source, topic, payload, reason), *more = conn.execute(
        "SELECT source, topic, payload, reason FROM rejected"
    ).fetchall()
    conn.close()
    assert not more
    assert source == "modbus:MTR-1"
    assert topic == f"tcp 127.0.0.1:{port} unit 1"
    assert reason == (
        "2 of 3 values not finite, the other 1 stored: "
        "thd (float32 input 2): NaN (0x7fc0 0x0000); "
        "energy (float64 input 4): inf (0x7ff0 0x0000 0x0000 0x0000)"
    )
    assert json.loads(payload)["raw"] == {
        "thd": "0x7fc0 0x0000",
        "energy": "0x7ff0 0x0000 0x0000 0x0000",
    }
    device = status_json(config)["modbus"]["devices"][0]
    assert device["rejected_values"] == 2 and device["state"] == "ok"


def failing_devices(sim: Simulator) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A healthy device and three failing ones, each on its own TCP endpoint."""
    healthy, hanging, refusing = Memory(), Memory(), Memory()
    for mem in (healthy, hanging, refusing):
        mem.put("holding", 0, words("uint32", 123456))
    ports = {name: free_port() for name in ("healthy", "hang", "exception", "closed")}
    sim.tcp(ports["healthy"], [healthy.device(1)])
    sim.tcp(ports["hang"], [hanging.device(1, action=never_answer)])
    sim.tcp(ports["exception"], [refusing.device(1, action=device_failure)])
    reg = [{"metric": "counter", "address": 0, "table": "holding", "type": "uint32"}]

    def dev(name: str, serial: str, **extra: Any) -> dict[str, Any]:
        return {
            "device": serial,
            "host": "127.0.0.1",
            "port": ports[name],
            "registers": reg,
            **extra,
        }

    devices = [
        dev("healthy", "OK-1", interval_secs=0.5),
        dev("hang", "HANG-1", timeout_secs=1, interval_secs=0.5, retry_max_secs=2),
        dev("exception", "EXC-1", interval_secs=0.5),
        dev("closed", "DEAD-1", interval_secs=0.5, retry_max_secs=2),
    ]
    return devices, ports


def test_once_names_each_failed_device(config_file: ConfigFactory, sim: Simulator) -> None:
    devices, ports = failing_devices(sim)
    devices.append(
        {
            "device": "RTU-404",
            "serial": "/dev/fieldgate-no-such-port",
            "registers": [{"metric": "x", "address": 0, "table": "input", "type": "int16"}],
        }
    )
    config = modbus_config(config_file, devices)
    started = time.monotonic()
    r = run_fieldgate("poll", "--once", config=config)
    elapsed = time.monotonic() - started
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("fieldgate: error: ")]
    assert len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0], r.stderr
    line = errors[0]
    assert line.startswith("fieldgate: error: poll failed for 4 of 5 Modbus devices: "), line
    assert "HANG-1 (no answer within 1 s reading holding 0-1)" in line
    assert "EXC-1 (Modbus exception 4 (server device failure) reading holding 0-1)" in line
    assert f"DEAD-1 (cannot connect to 127.0.0.1:{ports['closed']}: Connection refused)" in line
    assert "RTU-404 (cannot open /dev/fieldgate-no-such-port: No such file or directory)" in line
    assert "OK-1" not in line
    assert elapsed < 60  # the devices were polled side by side, not after each other (loose)
    db = db_of(config)
    assert [(d, m, v) for d, _, m, v, _ in rows(db)] == [("OK-1", "counter", 123456.0)]

    s = status_json(config)["modbus"]
    assert s["state"]["value"].startswith("last --once run: 1 ok, 4 failing (")
    by_device = {d["device"]: d for d in s["devices"]}
    assert by_device["OK-1"]["state"] == "ok"
    assert by_device["OK-1"]["last_success"] is not None
    for name, kind in (
        ("HANG-1", "timeout"),
        ("EXC-1", "exception"),
        ("DEAD-1", "connect"),
        ("RTU-404", "connect"),
    ):
        d = by_device[name]
        assert d["state"] == "failing" and d["failures_by_kind"] == {kind: 1}, d
        assert d["last_success"] is None and d["last_error_at"] is not None
    text = run_fieldgate("status", config=config).stdout
    assert "modbus          last --once run: 1 ok, 4 failing (HANG-1: no answer" in text
    lines = text.splitlines()
    ok = lines.index(f"  OK-1     ok       tcp 127.0.0.1:{ports['healthy']} unit 1")
    assert lines[ok + 1].startswith("    1 polls, 0 failed, 1 requests, 1 readings since ")
    assert lines[ok + 2].startswith("    last success 20")
    hang = lines.index(f"  HANG-1   FAILING  tcp 127.0.0.1:{ports['hang']} unit 1")
    assert lines[hang + 1].startswith("    1 polls, 1 failed (timeout 1), 1 requests, 0 readings")
    assert lines[hang + 2] == "    last success never"
    assert lines[hang + 3].startswith("    last error   20")
    assert lines[hang + 3].endswith(": no answer within 1 s reading holding 0-1")


def test_a_healthy_device_keeps_its_interval_beside_failing_ones(
    config_file: ConfigFactory, sim: Simulator, tmp_path: Path
) -> None:
    devices, _ = failing_devices(sim)
    # a fifth device answers its holding registers and refuses its input registers (exception
    # 2): answering in part, it keeps its schedule
    partial, partial_port = Memory(), free_port()
    partial.put("holding", 0, words("uint16", 7))
    partial.put("input", 0, words("uint16", 8))
    sim.tcp(partial_port, [partial.device(1, action=no_input_registers)])
    devices.append(
        {
            "device": "PART-1",
            "host": "127.0.0.1",
            "port": partial_port,
            "interval_secs": 0.5,
            "registers": [
                {"metric": "good", "address": 0, "table": "holding", "type": "uint16"},
                {"metric": "refused", "address": 0, "table": "input", "type": "uint16"},
            ],
        }
    )
    dead_http = free_port()
    config = modbus_config(
        config_file,
        devices,
        # an HTTP node in the same process: both kinds run side by side and stop together
    )
    data = yaml.safe_load(config.read_text())
    data["poll"]["nodes"] = [
        {"name": "gone", "url": f"http://127.0.0.1:{dead_http}/x", "device": "OK-1"}
    ]
    config.write_text(yaml.safe_dump(data))
    db = db_of(config)
    proc = start_fieldgate("poll", config=config, log=tmp_path / "poll.log")
    try:
        wait_until(
            lambda: count_rows(db, "readings", "device = 'OK-1'") >= 16,
            timeout=60,
            what="16 polls of the healthy device",
        )
        s = status_json(config)
    finally:
        rc = stop_process(proc, signal.SIGTERM, timeout=10)
    log = (tmp_path / "poll.log").read_text()
    assert rc == 0, log
    assert "Traceback" not in log, log
    ts = [t for _, t, _, _, _ in rows(db, "device = 'OK-1'")]
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    # every 0.5 s on a fixed grid: generous bounds, only to see that nobody held it up
    # (the hanging device alone waits 1 s per attempt)
    assert max(gaps) < 1500, gaps
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(500, abs=150), gaps
    by_device = {d["device"]: d for d in s["modbus"]["devices"]}
    assert by_device["OK-1"]["state"] == "ok" and by_device["OK-1"]["failures"] == 0
    for name, kind in (("HANG-1", "timeout"), ("EXC-1", "exception"), ("DEAD-1", "connect")):
        d = by_device[name]
        assert d["state"] == "failing" and set(d["failures_by_kind"]) == {kind}, d
    # backoff: the dead devices were tried far less often than the healthy one was polled
    ok_polls = by_device["OK-1"]["polls"]
    assert by_device["DEAD-1"]["polls"] < ok_polls / 2, by_device
    assert by_device["HANG-1"]["polls"] < ok_polls / 2, by_device
    # an exception code for every read is backed off too; one for some reads is not
    assert by_device["EXC-1"]["polls"] < ok_polls / 2, by_device
    part = by_device["PART-1"]
    assert part["state"] == "failing" and set(part["failures_by_kind"]) == {"exception"}, part
    assert part["polls"] >= ok_polls / 2 and part["next_attempt"] is None, part
    assert part["last_error"] == "Modbus exception 2 (illegal data address) reading input 0"
    good = [(m, v) for _, _, m, v, _ in rows(db, "device = 'PART-1'")]
    assert good and set(good) == {("good", 7.0)}, good
    assert count_rows(db, "readings", "device NOT IN ('OK-1', 'PART-1')") == 0
    conn = sqlite3.connect(str(db))
    state = dict(conn.execute("SELECT key, value FROM state").fetchall())
    conn.close()
    assert state["poller.modbus.state"] == "stopped"
    assert state["poller.state"] == "stopped"
    assert "modbus HANG-1" in log and "next try in" in log


def test_rtu_over_a_pty_pair_two_units_on_one_line(
    config_file: ConfigFactory, sim: Simulator, tmp_path: Path
) -> None:
    units = {}
    for unit in (1, 2):
        mem = Memory()
        mem.put("input", 0, words("float32", 229.5 + unit))
        mem.put("input", 70, words("float32", 50.0))
        mem.put("holding", 10, words("int32", -unit * 1000, "little"))
        mem.coils[3] = unit == 2
        units[unit] = mem
    with pty_pair(tmp_path) as (line, far_end):
        sim.rtu(far_end, [units[1].device(1), units[2].device(2)])
        regs = [
            {"metric": "voltage", "address": 0, "table": "input", "type": "float32"},
            {"metric": "frequency", "address": 70, "table": "input", "type": "float32"},
            {
                "metric": "balance",
                "address": 10,
                "table": "holding",
                "type": "int32",
                "word_order": "little",
            },
            {"metric": "relay", "address": 3, "table": "coil"},
        ]
        rtu = {"serial": line, "baudrate": 19200, "parity": "N", "stopbits": 1, "bytesize": 8}
        config = modbus_config(
            config_file,
            [
                {"device": "SDM-1", "unit": 1, "registers": regs, **rtu},
                {"device": "SDM-2", "unit": 2, "registers": regs, **rtu},
            ],
        )
        r = run_fieldgate("poll", "--once", config=config)
        assert r.returncode == 0, r
        s = status_json(config)["modbus"]
    got = {(d, m): v for d, _, m, v, _ in rows(db_of(config))}
    assert got == {
        ("SDM-1", "voltage"): 230.5,
        ("SDM-1", "frequency"): 50.0,
        ("SDM-1", "balance"): -1000.0,
        ("SDM-1", "relay"): 0.0,
        ("SDM-2", "voltage"): 231.5,
        ("SDM-2", "frequency"): 50.0,
        ("SDM-2", "balance"): -2000.0,
        ("SDM-2", "relay"): 1.0,
    }
    # input 0-1 and 70-71 are two reads (gap 68 > max_gap 10), holding one, coils one
    assert [d["requests"] for d in s["devices"]] == [4, 4]
    assert {d["where"] for d in s["devices"]} == {f"rtu {line} unit 1", f"rtu {line} unit 2"}


def test_rtu_crc_errors_and_a_silent_unit_are_named(
    config_file: ConfigFactory, tmp_path: Path
) -> None:
    mem = Memory()
    mem.put("holding", 0, words("uint16", 7))
    regs = [{"metric": "x", "address": 0, "table": "holding", "type": "uint16"}]
    with simulator() as noisy, simulator() as quiet:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with (
            pty_pair(tmp_path / "a") as (line_a, far_a),
            pty_pair(tmp_path / "b") as (
                line_b,
                far_b,
            ),
        ):
            noisy.rtu(far_a, [mem.device(1)], trace_packet=corrupt_crc)
            quiet.rtu(far_b, [mem.device(1), mem.device(5, action=never_answer)])
            line = {"parity": "N", "timeout_secs": 0.5}
            config = modbus_config(
                config_file,
                [
                    {"device": "CRC-1", "serial": line_a, "unit": 1, "registers": regs, **line},
                    {"device": "MUTE-5", "serial": line_b, "unit": 5, "registers": regs, **line},
                    {"device": "OK-1", "serial": line_b, "unit": 1, "registers": regs, **line},
                ],
            )
            r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 1, r
    line_out = r.stderr.strip().splitlines()[-1]
    assert line_out.startswith("fieldgate: error: poll failed for 2 of 3 Modbus devices: ")
    assert "CRC-1 (CRC error in the answer reading holding 0 (7 bytes))" in line_out
    assert "MUTE-5 (no answer within 0.5 s reading holding 0)" in line_out
    # the silent unit shares its line with OK-1, which still answered after it
    assert [(d, v) for d, _, _, v, _ in rows(db_of(config))] == [("OK-1", 7.0)]
    kinds = {d["device"]: d["failures_by_kind"] for d in status_json(config)["modbus"]["devices"]}
    assert kinds == {"CRC-1": {"crc": 1}, "MUTE-5": {"timeout": 1}, "OK-1": {}}


def test_http_nodes_and_modbus_devices_in_one_once_run(
    config_file: ConfigFactory, sim: Simulator
) -> None:
    mem = Memory()
    mem.put("holding", 0, words("uint16", 42))
    port = free_port()
    sim.tcp(port, [mem.device(1)])
    closed = free_port()
    reg = [{"metric": "x", "address": 0, "table": "holding", "type": "uint16"}]
    config = modbus_config(
        config_file,
        [
            {"device": "MB-1", "host": "127.0.0.1", "port": port, "registers": reg},
            {"device": "MB-2", "host": "127.0.0.1", "port": closed, "registers": reg},
        ],
    )
    data = yaml.safe_load(config.read_text())
    data["poll"]["nodes"] = [
        {"name": "gone", "url": f"http://127.0.0.1:{closed}/x", "device": "MB-1"}
    ]
    config.write_text(yaml.safe_dump(data))
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 1, r
    assert r.stderr.splitlines()[-1] == (
        "fieldgate: error: poll failed for 1 of 1 nodes and 1 of 2 Modbus devices: "
        "gone (cannot connect: Connection refused); "
        f"MB-2 (cannot connect to 127.0.0.1:{closed}: Connection refused)"
    )
    assert [(d, m, v) for d, _, m, v, _ in rows(db_of(config))] == [("MB-1", "x", 42.0)]


def test_units_behind_one_tcp_gateway_share_one_connection(
    config_file: ConfigFactory, sim: Simulator
) -> None:
    units = []
    for unit in (1, 2, 3):
        mem = Memory()
        mem.put("holding", 0, words("uint16", unit * 11))
        units.append(mem.device(unit))
    port = free_port()
    sim.tcp(port, units)
    reg = [{"metric": "x", "address": 0, "table": "holding", "type": "uint16"}]
    config = modbus_config(
        config_file,
        [
            {"device": f"U-{u}", "host": "127.0.0.1", "port": port, "unit": u, "registers": reg}
            for u in (1, 2, 3)
        ],
    )
    r = run_fieldgate("poll", "--once", config=config)
    assert r.returncode == 0, r
    assert [(d, v) for d, _, _, v, _ in rows(db_of(config))] == [
        ("U-1", 11.0),
        ("U-2", 22.0),
        ("U-3", 33.0),
    ]


def test_sigterm_stops_within_10_seconds_while_a_device_hangs(
    config_file: ConfigFactory, sim: Simulator, tmp_path: Path
) -> None:
    mem = Memory()
    mem.put("holding", 0, [1])
    port = free_port()
    sim.tcp(port, [mem.device(1, action=never_answer)])
    config = modbus_config(
        config_file,
        [
            {
                "device": "HANG-1",
                "host": "127.0.0.1",
                "port": port,
                "timeout_secs": 300,
                "registers": [{"metric": "x", "address": 0, "table": "holding", "type": "uint16"}],
            }
        ],
    )
    proc = start_fieldgate("poll", config=config, log=tmp_path / "poll.log")
    wait_until(lambda: sim.requests >= 1, what="the hanging request")
    started = time.monotonic()
    rc = stop_process(proc, signal.SIGTERM, timeout=10)
    assert rc == 0, (tmp_path / "poll.log").read_text()
    assert time.monotonic() - started < 10
    conn = sqlite3.connect(str(db_of(config)))
    state = conn.execute("SELECT value FROM state WHERE key = 'poller.modbus.state'").fetchone()
    conn.close()
    assert state == ("stopped",)


def test_an_unexpected_error_is_a_failed_poll_not_a_dead_bus(
    config_file: ConfigFactory, sim: Simulator
) -> None:
    mem = Memory()
    mem.put("holding", 0, words("uint32", 5))
    port = free_port()
    sim.tcp(port, [mem.device(1)])
    config = modbus_config(
        config_file,
        [
            {
                "device": "MB-1",
                "host": "127.0.0.1",
                "port": port,
                "registers": [{"metric": "x", "address": 0, "table": "holding", "type": "uint32"}],
            }
        ],
    )
    (target,) = build_targets(load_config(str(config)))
    # a plan that reads one register for a two-register value: decoding cannot work
    broken = dataclasses.replace(target, reads=(Read("holding", 0, 1, (0,)),))
    first, second = poll_tcp_once([broken, target])
    assert (first.kind, first.readings) == ("io", [])
    assert first.error is not None and first.error.startswith("internal error: ")
    # the bus goes on: the next poll with the real plan works
    assert second.readings[0][:2] == ("x", 5.0)


def _odd_peer(answer: Any) -> tuple[int, threading.Thread]:
    """A Modbus TCP peer on loopback that takes one connection, reads one 12-byte request and
    does ``answer(request) -> bytes | None`` with it: those bytes sent, or None to close."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                request = b""
                while len(request) < 12:
                    request += conn.recv(12 - len(request))
                reply = answer(request)
                if reply is None:
                    return
                conn.sendall(reply)
                conn.recv(1)  # until the client closes (it does after any failure)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def _mbap(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


@pytest.mark.parametrize(
    ("answer", "kind", "text"),
    [
        (lambda _r: None, "connect", "closed the connection reading holding 0-1"),
        (
            lambda r: _mbap(int.from_bytes(r[:2], "big") + 1, 1, b"\x03\x04\x00\x00\x00\x05"),
            "io",
            "unusable answer reading holding 0-1: answer for unit 1, transaction 2 "
            "(asked unit 1, transaction 1)",
        ),
        (lambda r: _mbap(1, 7, b"\x03\x04\x00\x00\x00\x05"), "io", "answer for unit 7"),
        (lambda r: _mbap(1, 1, b"\x03\x05\x00\x00\x00\x05"), "io", "garbled answer"),
        (lambda r: _mbap(1, 1, b"\x04\x04\x00\x00\x00\x05"), "io", "garbled answer"),
        (lambda r: _mbap(1, 1, b"\x03\x04\x00")[:9], "io", "garbled answer"),  # then silence
        (lambda r: _mbap(1, 1, b"\x83\x02"), "exception", "exception 2 (illegal data address)"),
        (lambda r: b"\x00\x01\x00\x07\x00\x03\x01\x03\x00", "io", "not a Modbus TCP header"),
    ],
)
def test_odd_tcp_answers_are_failed_reads(answer: Any, kind: str, text: str) -> None:
    port, thread = _odd_peer(answer)
    cfg = parse_config(
        {
            "site": {"serial": "GW"},
            "devices": {"allow_unknown": True},
            "poll": {
                "modbus": [
                    {
                        "device": "ODD",
                        "host": "127.0.0.1",
                        "port": port,
                        "registers": [
                            {"metric": "x", "address": 0, "table": "holding", "type": "uint32"}
                        ],
                    }
                ]
            },
        },
        "/etc/fieldgate/fieldgate.yaml",
    )
    (target,) = build_targets(cfg)
    (polled,) = poll_tcp_once([dataclasses.replace(target, timeout=0.5)])
    assert polled.kind == kind
    assert polled.error is not None and text in polled.error
    thread.join(10)
    assert not thread.is_alive()
