"""Services are running and enabled on the gateways and the hub."""

from __future__ import annotations

import pytest
from support import CONFIG_PATH, FIELDGATE

testinfra_hosts = ["gateways"]

GLUE_PROGRAMS = ["collect", "upload", "usb-watch"]


@pytest.mark.parametrize("service", ["mosquitto", "supervisor", "shorewall", "apcupsd"])
def test_service_running_and_enabled(host, service):
    svc = host.service(service)
    assert svc.is_running, f"{service} is not running"
    assert svc.is_enabled, f"{service} is not enabled at boot"


def supervisor_programs(host) -> dict[str, str]:
    """Program name -> state, from `supervisorctl status`."""
    out = host.run("supervisorctl status").stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("program", GLUE_PROGRAMS)
def test_glue_program_running(host, program):
    programs = supervisor_programs(host)
    matching = {
        name: state for name, state in programs.items() if name.split(":")[-1].endswith(program)
    }
    assert matching, f"no supervisor program for '{program}' in {programs}"
    assert set(matching.values()) == {"RUNNING"}, matching


def test_collector_and_uploader_run_as_service_user(host):
    # usb-watch runs as root by design (it mounts drives); the others must not.
    procs = [
        p
        for p in host.process.filter(comm="fieldgate")
        if {"collect", "upload"} & set(p.args.split())
    ]
    assert procs, "no collect/upload process"
    assert {p.user for p in procs} == {"fieldgate"}, [(p.args, p.user) for p in procs]


def test_mqtt_listens_on_sensor_network(host, net):
    sensor_ip = net["hosts"][host.backend.get_hostname()]["nets"]["sensor"]
    listening = [s for s in host.socket.get_listening_sockets() if s.endswith(":1883")]
    assert any(
        s in (f"tcp://{sensor_ip}:1883", "tcp://0.0.0.0:1883", "tcp://:::1883") for s in listening
    ), listening


def test_config_is_valid(host):
    host.check_output(f"{FIELDGATE} --config {CONFIG_PATH} check-config")
