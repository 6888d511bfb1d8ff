"""Reboot of a gateway: everything comes back by itself, nothing is lost. Runs last."""

from __future__ import annotations

from support import (
    await_at_hub,
    count,
    get_host,
    hosts_tool,
    probe_from,
    probe_here,
    send_readings,
    wait_for,
)

SERVICES = ["mosquitto", "supervisor", "shorewall", "apcupsd"]


def all_programs_running(host) -> bool:
    lines = host.run("supervisorctl status").stdout.splitlines()
    return bool(lines) and all(line.split()[1] == "RUNNING" for line in lines if line.strip())


def test_gateway_comes_back_after_reboot(sensor, hub, net):
    before = send_readings(sensor, net, "gw2", n=3, repeat=1)
    await_at_hub(hub, before)
    gw = get_host("gw2")
    total = count(gw, before["db"], "1 = 1")

    hosts_tool("restart", "gw2")

    gw = get_host("gw2")
    for service in SERVICES:
        wait_for(f"{service} after the reboot", lambda s=service: gw.service(s).is_running)
    wait_for("the glue programs after the reboot", lambda: all_programs_running(gw))
    assert count(gw, before["db"], "1 = 1") == total
    assert probe_from(sensor, net["hosts"]["gw2"]["nets"]["sensor"], 1883) == "open"
    assert probe_here(net["hosts"]["gw2"]["nets"]["mgmt"], 1883) == "filtered"

    after = send_readings(sensor, net, "gw2", n=3, repeat=1)
    assert len(await_at_hub(hub, after)) == 6
