"""The hub serves the upload API; site.yml enrolled every gateway with it."""

from __future__ import annotations

from support import GATEWAYS, gateway_config, get_host, hub_db, probe_here, sql

testinfra_hosts = ["hubs"]


def test_supervisor_running_and_enabled(host):
    assert host.service("supervisor").is_running
    assert host.service("supervisor").is_enabled


def test_hub_serves_and_its_database_exists(host, net):
    db = hub_db(host)
    assert host.file(db).exists, db
    cmdline = host.check_output("pgrep -a -f 'fieldgate hub serve' | grep -v pgrep | head -n 1")
    port = int(cmdline.split("--listen")[1].split()[0].rsplit(":", 1)[1])
    assert probe_here(net["hosts"]["hub"]["nets"]["mgmt"], port) == "open"


def test_pin_helper_is_root_only(host):
    helper = host.file("/usr/local/sbin/fieldgate-hub-pin")
    assert (helper.user, helper.group, helper.mode) == ("root", "root", 0o700)


def test_site_yml_enrolled_every_gateway_once(host):
    """One PIN per gateway, issued by the hub and used by the gateway's registration; the
    second converge (idempotence) issued none."""
    serials = sorted(gateway_config(get_host(gw))["site"]["serial"] for gw in GATEWAYS)
    pins = sql(
        host,
        hub_db(host),
        "SELECT serial, COUNT(*) AS issued, COUNT(used_at) AS used FROM pins GROUP BY serial "
        "ORDER BY serial",
    )
    assert pins == [{"serial": s, "issued": 1, "used": 1} for s in serials]
    keys = sql(host, hub_db(host), "SELECT serial FROM gateway_keys WHERE revoked_at IS NULL")
    assert sorted(k["serial"] for k in keys) == serials
