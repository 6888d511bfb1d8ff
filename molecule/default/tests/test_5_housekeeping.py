"""Housekeeping on the gateways: prune runs from a systemd timer, the logs are bounded, and
with fieldgate_log_journal (gw1) the glue's programs log to the journal as fieldgate-<command>."""

from __future__ import annotations

import pytest
from support import gateway_config, get_host, host_vars

testinfra_hosts = ["gateways"]

# the start line names every subscription; the native one comes first
COLLECTOR_STARTED = "collecting fieldgate/+/readings"


def test_prune_timer_is_scheduled(host):
    assert host.service("fieldgate-prune.timer").is_enabled
    assert host.service("fieldgate-prune.timer").is_running
    show = host.check_output("systemctl show fieldgate-prune.timer -p TimersCalendar -p Persistent")
    assert "OnCalendar=*-*-* 00:00:00" in show  # "daily", as systemd normalises it
    assert "Persistent=yes" in show


def test_prune_runs_as_the_service_user_and_says_what_it_did(host):
    since = host.check_output("date +%s")
    host.check_output("systemctl start fieldgate-prune.service")
    assert (
        host.check_output("systemctl show fieldgate-prune.service -p User --value") == "fieldgate"
    )
    said = host.check_output(f"journalctl -t fieldgate-prune --since @{since} --no-pager -o cat")
    assert "pruned 0 readings uploaded before" in said
    assert "(retention 90 days)" in said
    # the same lines under the unit's name
    by_unit = host.check_output(
        f"journalctl -u fieldgate-prune.service --since @{since} --no-pager -o cat"
    )
    assert "pruned 0 readings uploaded before" in by_unit


def test_logs_are_bounded(host):
    cfg = gateway_config(host)
    assert cfg["export"]["log_max_bytes"] == 10 * 1024 * 1024
    assert cfg["export"]["log_backups"] == 5
    programs = host.file("/etc/supervisor/conf.d/fieldgate.conf").content_string
    assert programs.count("stdout_logfile_maxbytes=10MB") == programs.count("[program:")
    # the broker's log: Debian's rotation, run by logrotate's timer
    assert host.service("logrotate.timer").is_enabled
    host.check_output("logrotate --debug /etc/logrotate.d/mosquitto")


@pytest.mark.parametrize("gw", ["gw1", "gw2"])
def test_journal_switch(gw):
    host = get_host(gw)
    seen = host.run(
        f"journalctl -t fieldgate-collect --no-pager -o cat | grep -c -F '{COLLECTOR_STARTED}'"
    )
    if host_vars(gw).get("fieldgate_log_journal"):
        assert int(seen.stdout.strip() or 0) >= 1, (
            "the collector's start line is not in the journal"
        )
        # journald files the programs under the unit that runs them (supervisor.service)
        by_unit = host.run(
            "journalctl -u supervisor.service -t fieldgate-collect --no-pager -o cat"
            f" | grep -c -F '{COLLECTOR_STARTED}'"
        )
        assert int(by_unit.stdout.strip() or 0) >= 1, "not found with journalctl -u supervisor"
        # and supervisor's file still has it
        log = host.file("/var/log/fieldgate/fieldgate-collect.supervisor.log").content_string
        assert COLLECTOR_STARTED in log
    else:
        assert seen.stdout.strip() == "0"
