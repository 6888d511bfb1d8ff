"""MQTT security on the gateways' sensor listener, from the sensor host."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support import (
    CONFIG_PATH,
    FIELDGATE,
    GATEWAYS,
    device_password,
    gateway_config,
    get_host,
    host_vars,
    now_ms,
    publish,
    sql,
    wait_for,
)

# MQTT 3.1.1 CONNACK codes: 4 bad user name or password, 5 not authorised.
REFUSED = {"4", "5"}


@pytest.mark.parametrize("gw", GATEWAYS)
def test_anonymous_refused(sensor, net, gw):
    code = sensor.check_output(
        "fieldgate-probe connect %s 1883", net["hosts"][gw]["nets"]["sensor"]
    )
    assert code in REFUSED


@pytest.mark.parametrize("gw", GATEWAYS)
def test_wrong_password_refused(sensor, net, gw):
    device = host_vars(gw)["fieldgate_devices"][0]["serial"]
    code = sensor.check_output(
        "fieldgate-probe connect %s 1883 -u %s -P %s",
        net["hosts"][gw]["nets"]["sensor"],
        device,
        "not-the-password",
    )
    assert code in REFUSED


def test_device_cannot_publish_as_another_device(sensor, net):
    """A device publishing under another device's topic: the broker's ACL drops it.

    The forged reading is followed, on the same connection, by a genuine one; once the
    genuine one is stored, the forged one would have been stored before it.
    """
    gw = get_host("gw1")
    cfg = gateway_config(gw)
    devices = host_vars("gw1")["fieldgate_devices"]
    me, victim = devices[0]["serial"], devices[1]["serial"]
    prefix = cfg["mqtt"]["topic_prefix"]
    ts = now_ms()
    address = net["hosts"]["gw1"]["nets"]["sensor"]
    login = (me, device_password("gw1", me))
    forged = publish(sensor, address, login, f"{prefix}/{victim}/readings",
                     [{"ts": ts, "metrics": {"forged": 1}}])  # fmt: skip
    assert forged.rc == 0, forged.stderr
    genuine = publish(sensor, address, login, f"{prefix}/{me}/readings",
                      [{"ts": ts, "metrics": {"genuine": 1}}])  # fmt: skip
    assert genuine.rc == 0, genuine.stderr
    db = cfg["store"]["path"]
    wait_for(
        "the genuine reading in the gateway store",
        lambda: sql(gw, db, f"SELECT 1 FROM readings WHERE ts = {ts} AND metric = 'genuine'"),  # noqa: S608 (the test's own values)
    )
    assert (
        sql(gw, db, f"SELECT device, metric FROM readings WHERE ts = {ts} AND metric = 'forged'")  # noqa: S608 (the test's own values)
        == []
    )
    assert sql(gw, db, f"SELECT reason FROM rejected WHERE payload LIKE '%{ts}%forged%'") == []  # noqa: S608 (the test's own values)

    # ... but not without a trace: the broker's plugin counted the denial, status names the account
    def refused() -> dict[str, Any] | None:
        status = json.loads(gw.check_output(f"{FIELDGATE} --config {CONFIG_PATH} status --json"))
        by_account = {a["account"]: a for a in status["broker_refusals"]["accounts"]}
        return by_account.get(me)

    mine = wait_for("the denial counted for the device's account", refused)
    assert mine["denied"] >= 1
    assert mine["last_topic"] == f"{prefix}/{victim}/readings"


def test_protocol_error_is_counted_and_names_the_device(sensor, net):
    """A device that sends what is no MQTT packet is disconnected; the plugin finds why in
    the broker's log (/var/log/mosquitto/mosquitto.log) and status names the account."""
    gw = get_host("gw1")
    me = host_vars("gw1")["fieldgate_devices"][0]["serial"]
    address = net["hosts"]["gw1"]["nets"]["sensor"]

    def dropped() -> int:
        status = json.loads(gw.check_output(f"{FIELDGATE} --config {CONFIG_PATH} status --json"))
        p = status["broker_refusals"]["protocol_errors"]
        assert p["state"] == "reading", p
        return sum(s["errors"] for s in p["sources"] if s["account"] == me)

    before = wait_for("the plugin reading the broker's log", lambda: (dropped(),))[0]
    code = sensor.check_output(
        "fieldgate-probe garbage %s 1883 -u %s -P %s", address, me, device_password("gw1", me)
    )
    assert code == "0"
    wait_for("the protocol error counted for the device", lambda: dropped() == before + 1)
    text = gw.check_output(f"{FIELDGATE} --config {CONFIG_PATH} status")
    assert f"  {me} " in text.split("broker dropped")[1]
