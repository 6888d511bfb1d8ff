"""The hub serves the upload API."""

from __future__ import annotations

from support import hub_db, probe_here

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
