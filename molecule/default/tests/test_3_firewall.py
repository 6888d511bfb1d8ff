"""The gateways' firewall, probed from outside: the sensor host, the hub and this machine."""

from __future__ import annotations

import pytest
from support import GATEWAYS, probe_from, probe_here

# Ports nothing should answer on from anywhere (besides the ones a rule opens).
OTHER_PORTS = [80, 1884, 8080]


@pytest.mark.parametrize("gw", GATEWAYS)
def test_mqtt_open_from_sensor_network(sensor, net, gw):
    assert probe_from(sensor, net["hosts"][gw]["nets"]["sensor"], 1883) == "open"


@pytest.mark.parametrize("gw", GATEWAYS)
@pytest.mark.parametrize("port", [22, *OTHER_PORTS])
def test_other_ports_dropped_from_sensor_network(sensor, net, gw, port):
    assert probe_from(sensor, net["hosts"][gw]["nets"]["sensor"], port) == "filtered"


@pytest.mark.parametrize("gw", GATEWAYS)
def test_mqtt_dropped_from_the_uplink(hub, net, gw):
    assert probe_from(hub, net["hosts"][gw]["nets"]["mgmt"], 1883) == "filtered"


@pytest.mark.parametrize("gw", GATEWAYS)
def test_mqtt_dropped_from_management(net, gw):
    assert probe_here(net["hosts"][gw]["nets"]["mgmt"], 1883) == "filtered"


@pytest.mark.parametrize("gw", GATEWAYS)
def test_ssh_from_management(net, gw):
    assert probe_here(net["hosts"][gw]["nets"]["mgmt"], 22) == "open"


@pytest.mark.parametrize("gw", GATEWAYS)
@pytest.mark.parametrize("port", OTHER_PORTS)
def test_other_ports_dropped_from_management(net, gw, port):
    assert probe_here(net["hosts"][gw]["nets"]["mgmt"], port) == "filtered"
