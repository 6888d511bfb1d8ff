"""The hub serves the upload API; site.yml enrolled every gateway with it."""

from __future__ import annotations

import json

from support import (
    GATEWAYS,
    gateway_config,
    get_host,
    group_vars,
    hub_command,
    hub_db,
    hub_serve_args,
    probe_here,
    sql,
)

testinfra_hosts = ["hubs"]


def test_supervisor_running_and_enabled(host):
    assert host.service("supervisor").is_running
    assert host.service("supervisor").is_enabled


def test_hub_serves_and_its_database_exists(host, net):
    db = hub_db(host)
    version = sql(host, db, "SELECT value FROM meta WHERE key = 'hub_schema_version'")
    assert len(version) == 1 and int(version[0]["value"]) >= 1, (db, version)
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


def test_hub_runs_on_postgresql_with_its_password_in_a_file(host):
    args = hub_serve_args(host)
    assert hub_db(host) == "postgresql://fieldgate_hub@127.0.0.1:5432/fieldgate_hub"
    password = group_vars("hubs")["hub_postgresql_password"]
    assert not any(password in a for a in args)
    secret = host.file(args[args.index("--db-password-file") + 1])
    assert (secret.user, secret.group, secret.mode) == ("fieldgate-hub", "fieldgate-hub", 0o400)
    assert host.file("/etc/fieldgate-hub").mode == 0o750
    assert password not in host.check_output("ps -eo args")
    assert host.service("postgresql").is_running
    assert host.service("postgresql").is_enabled
    # the schema is the hub's, owned by its role; the admin of the inventory exists
    assert sql(
        host, hub_db(host), "SELECT tableowner FROM pg_tables WHERE tablename = 'samples'"
    ) == [{"tableowner": "fieldgate_hub"}]
    users = json.loads(hub_command(host, "user", "list", "--json"))
    admin = group_vars("hubs")["hub_admin_user"]
    assert [(u["name"], u["admin"]) for u in users if u["name"] == admin] == [(admin, True)]
