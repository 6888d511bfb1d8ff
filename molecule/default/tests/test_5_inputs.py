"""Devices as they are (docs/inputs.md): gw1's inventory gives it a Tasmota and a Zigbee2MQTT
input; the sensor host publishes as those devices do, with their broker accounts."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from support import (
    count,
    device_password,
    gateway_config,
    get_host,
    hub_db,
    now_ms,
    publish,
    sql,
    wait_for,
)

GW = "gw1"
TASMOTA = "tasmota-th16"
ZIGBEE = "0x00158d0001b79111"
BRIDGE = "zigbee2mqtt"  # the bridge's account (fieldgate_mqtt_accounts)
FIELDGATE = "/opt/fieldgate/venv/bin/fieldgate"
PLUGIN = "/usr/local/lib/fieldgate/fieldgate_stamp.so"


def tasmota_payload(**sensors: dict[str, float]) -> tuple[dict[str, Any], int]:
    """A Tasmota SENSOR payload with the device's own Time (UTC: the input sets no timezone)
    and that time in epoch ms."""
    when = datetime.now(UTC).replace(microsecond=0)
    return {"Time": when.strftime("%Y-%m-%dT%H:%M:%S"), **sensors, "TempUnit": "C"}, int(
        when.timestamp() * 1000
    )


def test_the_broker_loads_what_broker_conf_prints():
    gw = get_host(GW)
    # the role asks with the file where the plugin counts refusals, which status reads, and
    # the broker's log, where the plugin finds the protocol errors
    refusals = gateway_config(gw)["mqtt"]["broker_refusals_file"]
    log = "/var/log/mosquitto/mosquitto.log"
    printed = gw.check_output(
        f"{FIELDGATE} broker-conf --plugin {PLUGIN} --refusals-file {refusals} --broker-log {log}"
    )
    assert f"plugin {PLUGIN}" in printed
    assert f"plugin_opt_refusals_file {refusals}" in printed
    assert f"plugin_opt_broker_log {log}" in printed
    dropin = gw.file("/etc/mosquitto/conf.d/30-fieldgate-stamp.conf")
    assert dropin.content_string.strip() == printed.strip()
    # the running broker has the plugin loaded (it was restarted after the drop-in came)
    pid = gw.check_output("systemctl show -p MainPID --value mosquitto")
    assert PLUGIN in gw.file(f"/proc/{pid}/maps").content_string


def test_device_formats_reach_the_hub_exactly_once(sensor, hub, net):
    gw = get_host(GW)
    cfg = gateway_config(gw)
    db = cfg["store"]["path"]
    address = net["hosts"][GW]["nets"]["sensor"]
    start = now_ms()
    # Tasmota, with its own time; sent twice, as a device does that missed the PUBACK.
    payload, tasmota_ts = tasmota_payload(AM2301={"Temperature": 21.5, "Humidity": 58.2})
    for _ in range(2):
        res = publish(
            sensor, address, (TASMOTA, device_password(GW, TASMOTA)), f"tele/{TASMOTA}/SENSOR",
            [payload],
        )  # fmt: skip
        assert res.rc == 0, res.stderr
    # Zigbee2MQTT, through the bridge's account: no time, so each message takes the broker's
    # arrival stamp; three messages of three readings (linkquality excluded, null skipped).
    states = [
        {"battery": 97, "humidity": 44.0 + i, "temperature": 20.0 + i, "linkquality": 120,
         "action": None}
        for i in range(3)
    ]  # fmt: skip
    res = publish(
        sensor, address, (BRIDGE, device_password(GW, BRIDGE)), f"zigbee2mqtt/{ZIGBEE}", states
    )
    assert res.rc == 0, res.stderr
    published = now_ms()

    tasmota_where = f"device = '{TASMOTA}' AND ts = {tasmota_ts}"
    zigbee_where = f"device = '{ZIGBEE}' AND ts >= {start}"
    wait_for(
        "the device readings in the gateway store",
        lambda: count(gw, db, tasmota_where) == 2 and count(gw, db, zigbee_where) == 9,
    )
    hub_path = hub_db(hub)
    serial = cfg["site"]["serial"]

    def at_hub(where: str) -> list[dict[str, Any]]:
        query = (
            "SELECT metric, ts, value FROM readings "  # noqa: S608 (the test's own values)
            f"WHERE serial = '{serial}' AND {where} ORDER BY ts, metric"
        )
        return sql(hub, hub_path, query)

    wait_for(
        "the device readings at the hub",
        lambda: len(at_hub(tasmota_where)) >= 2 and len(at_hub(zigbee_where)) >= 9,
    )
    time.sleep(2 * cfg["upload"]["interval_secs"])  # a second upload would have come by now
    assert at_hub(tasmota_where) == [
        {"metric": "AM2301.Humidity", "ts": tasmota_ts, "value": 58.2},
        {"metric": "AM2301.Temperature", "ts": tasmota_ts, "value": 21.5},
    ]
    zigbee = at_hub(zigbee_where)
    assert len(zigbee) == 9
    assert {row["metric"] for row in zigbee} == {"battery", "humidity", "temperature"}
    assert [row["value"] for row in zigbee if row["metric"] == "temperature"] == [20.0, 21.0, 22.0]
    # one stamp per message, given by the broker between the first publish and the last PUBACK
    stamps = sorted({row["ts"] for row in zigbee})
    assert len(stamps) == 3
    assert start <= stamps[0] and stamps[-1] <= published
    # the collector never fell back to its own receive time
    status = json.loads(
        gw.check_output(f"FIELDGATE_CONFIG=/etc/fieldgate/fieldgate.yaml {FIELDGATE} status --json")
    )
    zigbee_input = next(i for i in status["inputs"] if i["topic"] == "zigbee2mqtt/{device}")
    assert zigbee_input["messages"] >= 3
    assert zigbee_input["unstamped"] == 0


def test_device_account_cannot_publish_on_another_devices_input(sensor, net):
    """The Tasmota device's account publishing as the Zigbee sensor: the ACL drops it.

    The forged message is followed, on the same connection, by a genuine one; once the
    genuine one is stored, the forged one would have been stored before it.
    """
    gw = get_host(GW)
    db = gateway_config(gw)["store"]["path"]
    address = net["hosts"][GW]["nets"]["sensor"]
    start = now_ms()
    password = device_password(GW, TASMOTA)
    forged = publish(
        sensor, address, (TASMOTA, password), f"zigbee2mqtt/{ZIGBEE}", [{"temperature": 99.25}]
    )
    assert forged.rc == 0, forged.stderr
    payload, ts = tasmota_payload(SI7021={"Temperature": 19.75})
    genuine = publish(sensor, address, (TASMOTA, password), f"tele/{TASMOTA}/SENSOR", [payload])
    assert genuine.rc == 0, genuine.stderr
    genuine_where = f"device = '{TASMOTA}' AND metric = 'SI7021.Temperature' AND ts = {ts}"
    wait_for("the genuine reading in the gateway store", lambda: count(gw, db, genuine_where))
    assert count(gw, db, f"device = '{ZIGBEE}' AND ts >= {start}") == 0
    assert sql(gw, db, "SELECT reason FROM rejected WHERE payload LIKE '%99.25%'") == []
