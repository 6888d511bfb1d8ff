"""Files and modes on the gateways: secrets 0600, no secret readable by others or in logs."""

from __future__ import annotations

import shlex

import pytest
from support import gateway_config, group_vars, host_vars

testinfra_hosts = ["gateways"]

SECRET_KEYS = ["mqtt.password_file", "upload.key_file", "export.password_file"]


def secret_path(cfg: dict, key: str) -> str:
    section, name = key.split(".")
    return cfg[section][name]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_file_mode(host, key):
    cfg = gateway_config(host)
    path = secret_path(cfg, key)
    f = host.file(path)
    assert f.is_file, f"{key}: {path} missing"
    assert f.mode == 0o600, f"{path} has mode {oct(f.mode)}"
    assert f.user != "root" or f.group != "root", (
        f"{path} is owned by root:root, not the service user"
    )


def test_config_not_world_writable(host):
    f = host.file("/etc/fieldgate/fieldgate.yaml")
    assert not f.mode & 0o002


def test_store_closed_to_other_users(host):
    cfg = gateway_config(host)
    assert host.file(cfg["store"]["path"]).exists
    data_dir = host.file(cfg["store"]["path"].rsplit("/", 1)[0])
    assert not data_dir.mode & 0o007, f"{data_dir.path} mode {oct(data_dir.mode)}"


def known_secrets(host) -> list[str]:
    """Every secret the gateway holds: from its secret files and the scenario inventory."""
    cfg = gateway_config(host)
    values = [host.file(secret_path(cfg, k)).content_string.strip() for k in SECRET_KEYS]
    name = host.backend.get_hostname()
    values += [d.get("mqtt_password") for d in host_vars(name).get("fieldgate_devices", [])]
    values.append(host_vars(name).get("mosquitto_bridge", {}).get("remote_password", ""))
    values += [a["password"] for a in host_vars(name).get("fieldgate_mqtt_accounts", [])]
    values.append(group_vars("gateways")["fieldgate_mqtt_password"])
    return sorted({v for v in values if v})


def test_no_secret_in_world_readable_files(host):
    patterns = " ".join(f"-e {shlex.quote(s)}" for s in known_secrets(host))
    # Every regular file that any user may read, outside the package trees.
    leaks = host.run(
        "find /etc /var /run /opt /srv /home /root /tmp -xdev -type f -perm -o+r "
        "-not -path '/var/cache/fieldgate-bundle/*' -not -path '/var/lib/apt/*' "
        "-not -path '/var/lib/dpkg/*' -not -path '/var/cache/apt/*' -print0 "
        f"| xargs -0 -r grep -l -F {patterns}"
    )
    assert leaks.stdout.strip() == "", f"secrets readable by everyone in: {leaks.stdout}"


def test_no_secret_in_logs(host):
    patterns = " ".join(f"-e {shlex.quote(s)}" for s in known_secrets(host))
    in_journal = host.run(f"journalctl --no-pager -o cat | grep -c -F {patterns}")
    assert in_journal.stdout.strip() == "0", "a secret appears in the journal"
    in_files = host.run(f"grep -r -l -F {patterns} /var/log")
    assert in_files.stdout.strip() == "", f"a secret appears in {in_files.stdout}"
