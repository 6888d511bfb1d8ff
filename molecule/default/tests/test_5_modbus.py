"""Modbus: gw1 polls the sensor host's Modbus TCP server (pymodbus's own, serving known
registers) through its firewall, whose rule comes from the inventory; the readings reach the
hub exactly once. gw1's second Modbus device sits on a serial port that is not there."""

from __future__ import annotations

import json
import struct

import pytest
from support import (
    CONFIG_PATH,
    FIELDGATE,
    gateway_config,
    get_host,
    host_vars,
    hub_db,
    sql,
    wait_for,
)

MODBUS_PORT = host_vars("sensor")["modbus_device_port"]
VALUES = host_vars("sensor")["modbus_device_values"]
METER, DRIVE = host_vars("gw1")["fieldgate_modbus_devices"]


def float32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


def expected_readings() -> dict[str, float]:
    """What the meter's map makes of the values the sensor host serves."""
    return {
        r["metric"]: float32(VALUES[r["address"]]) * r.get("scale", 1.0) + r.get("offset", 0.0)
        for r in METER["registers"]
    }


def serial_of(gw, name: str) -> str:
    """The device's serial (a Modbus device may be named by its alias)."""
    for device in host_vars(gw)["fieldgate_devices"]:
        if name in (device["serial"], device.get("alias")):
            return device["serial"]
    raise KeyError(name)


def connect_from(host, address: str, port: int) -> str:
    """open, closed (refused or rejected) or filtered, as the host sees a TCP connect."""
    script = (
        "import socket,sys\n"
        "try:\n"
        f" socket.create_connection(({address!r}, {port}), timeout=3).close(); print('open')\n"
        "except ConnectionRefusedError: print('closed')\n"
        "except OSError: print('filtered')\n"
    )
    return host.check_output("python3 -c %s", script)


def test_the_rule_for_the_meter_comes_from_the_inventory(net):
    gw = get_host("gw1")
    sensor_ip = net["hosts"]["sensor"]["nets"]["sensor"]
    rules = gw.file("/etc/shorewall/rules").content_string
    assert f"ACCEPT\t$FW\tsensor:{sensor_ip}\ttcp\t{MODBUS_PORT}\t" in rules, rules
    assert "$FW\tsensor\tREJECT" in gw.file("/etc/shorewall/policy").content_string


def test_the_gateway_reaches_the_meter_and_nothing_else_on_the_sensor_network(net):
    gw = get_host("gw1")
    sensor_ip = net["hosts"]["sensor"]["nets"]["sensor"]
    assert connect_from(gw, sensor_ip, MODBUS_PORT) == "open"
    # the sensor host's SSH answers from everywhere else, but the policy rejects the gateway
    assert connect_from(gw, sensor_ip, 22) == "closed"
    assert connect_from(get_host("gw2"), sensor_ip, 22) == "open"


def test_meter_readings_reach_the_hub_exactly_once(hub):
    gw = get_host("gw1")
    cfg = gateway_config(gw)
    device = serial_of("gw1", METER["device"])
    expected = expected_readings()
    db = cfg["store"]["path"]
    # a poll whose readings are all stored (every poll stores the whole map in one commit)
    ts = wait_for(
        "a poll of the meter in the gateway store",
        lambda: [
            row["ts"]
            for row in sql(
                gw,
                db,
                f"SELECT ts FROM readings WHERE device = '{device}' AND source = 'modbus:{device}' "  # noqa: S608 (the test's own values)
                f"GROUP BY ts HAVING COUNT(*) = {len(expected)} ORDER BY ts LIMIT 1",
            )
        ],
    )[0]
    where = f"device = '{device}' AND ts = {ts}"
    stored = {
        r["metric"]: r["value"]
        for r in sql(gw, db, f"SELECT metric, value FROM readings WHERE {where}")  # noqa: S608 (the test's own values)
    }
    assert stored == pytest.approx(expected, rel=1e-9)
    hub_path = hub_db(hub)
    hub_where = f"serial = '{cfg['site']['serial']}' AND {where}"
    wait_for(
        "the meter's poll at the hub",
        lambda: (
            sql(hub, hub_path, f"SELECT COUNT(*) AS n FROM readings WHERE {hub_where}")[0]["n"]  # noqa: S608 (the test's own values)
            >= len(expected)
        ),
    )
    rows = sql(
        hub,
        hub_path,
        f"SELECT metric, value FROM readings WHERE {hub_where} ORDER BY metric",  # noqa: S608 (the test's own values)
    )
    assert [r["metric"] for r in rows] == sorted(expected)  # each metric once
    assert {r["metric"]: r["value"] for r in rows} == pytest.approx(expected, rel=1e-9)


def test_status_names_each_modbus_device():
    gw = get_host("gw1")
    status = json.loads(gw.check_output(f"{FIELDGATE} --config {CONFIG_PATH} status --json"))
    devices = {d["device"]: d for d in status["modbus"]["devices"]}
    meter = devices[serial_of("gw1", METER["device"])]
    assert meter["state"] == "ok" and meter["readings"] > 0, meter
    drive = devices[serial_of("gw1", DRIVE["device"])]
    assert drive["state"] == "failing", drive
    assert f"cannot open {DRIVE['serial']}: No such file or directory" in drive["last_error"]


def test_poll_runs_where_devices_are_polled_and_as_the_service_user():
    programs = get_host("gw1").check_output("supervisorctl status")
    assert (
        "fieldgate-poll" in programs
        and "RUNNING" in programs.split("fieldgate-poll")[1].split("\n")[0]
    )
    assert "fieldgate-poll" not in get_host("gw2").check_output("supervisorctl status")
    procs = [
        p for p in get_host("gw1").process.filter(comm="fieldgate") if "poll" in p.args.split()
    ]
    assert {p.user for p in procs} == {"fieldgate"}, [(p.args, p.user) for p in procs]


def test_serial_ports_only_where_a_device_is_on_one():
    # gw1 has a Modbus device on a serial port: its service user is in dialout, and no more
    groups = get_host("gw1").check_output("id -nG fieldgate").split()
    assert sorted(groups) == ["dialout", "fieldgate"]
    assert get_host("gw2").check_output("id -nG fieldgate").split() == ["fieldgate"]
