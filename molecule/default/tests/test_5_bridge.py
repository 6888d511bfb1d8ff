"""The MQTT bridge: gw2's broker forwards readings to the central broker on the hub over TLS,
holding only the CA certificate (no certificate of its own), and gw2's store still gets each
reading exactly once."""

from __future__ import annotations

import json
import shlex
import time

from support import count, get_host, host_vars, send_readings, wait_for

CENTRAL_CA = "/etc/mosquitto/central/ca.crt"  # prepare.yml's central broker on the hub


def central_sub(hub, net, *args: str):
    """mosquitto_sub against the central broker, over TLS, as the tests' reader."""
    central = host_vars("hub")["molecule_central_broker"]
    base = [
        "mosquitto_sub", "-h", net["hosts"]["hub"]["nets"]["mgmt"],
        "-p", str(central["port"]), "--cafile", CENTRAL_CA,
        "-u", central["reader"], "-P", central["reader_password"],
    ]  # fmt: skip
    return hub.run(shlex.join(base + list(args)))


def test_the_gateway_holds_the_ca_certificate_only():
    gw = get_host("gw2")
    assert gw.file("/etc/mosquitto/certs/ca.crt").is_file
    assert not gw.file("/etc/mosquitto/certs/server.crt").exists
    conf = gw.file("/etc/mosquitto/conf.d/20-bridge.conf")
    assert conf.mode == 0o640 and conf.group == "mosquitto"
    assert "bridge_cafile /etc/mosquitto/certs/ca.crt" in conf.content_string


def test_readings_published_at_the_gateway_reach_the_central_broker(sensor, hub, net):
    wait_for(
        "the bridge of gw2 connected to the central broker",
        lambda: central_sub(hub, net, "-t", "$SYS/broker/connection/+/state", "-C", "1",
                            "-W", "5").stdout.strip() == "1",
    )  # fmt: skip
    # a persistent session on the central broker, so nothing sent from now on is missed
    session = ["-i", "molecule-bridge-check", "-c", "-q", "1", "-t", "gateways/MOL-GW-0002/#"]
    assert central_sub(hub, net, *session, "-E").rc == 0

    sent = send_readings(sensor, net, "gw2", n=5, repeat=1)
    got = central_sub(hub, net, *session, "-v", "-C", "5", "-W", "120")
    assert got.rc == 0, got.stderr
    lines = got.stdout.splitlines()
    topic = f"gateways/MOL-GW-0002/{sent['device']}/readings"
    assert [line.split(" ", 1)[0] for line in lines] == [topic] * 5
    stamps = sorted(json.loads(line.split(" ", 1)[1])["ts"] for line in lines)
    assert stamps == [sent["base"] + i for i in range(5)]

    # the gateway's own store has each reading once (two metrics each), and no more arrive
    rows = 2 * sent["n"]
    wait_for(
        "the readings in gw2's store",
        lambda: count(sent["host"], sent["db"], sent["where"]) == rows,
    )
    time.sleep(3)
    assert count(sent["host"], sent["db"], sent["where"]) == rows
