"""playbooks/backup.yml and playbooks/restore.yml against real test hosts.

gw-a collects and uploads readings as MOL-GW-A; backup.yml fetches its snapshot to this
machine; restore.yml brings it onto gw-b as MOL-GW-R (with a PIN from the hub) and waits for
the backlog to drain: the hub then holds the same readings under MOL-GW-R exactly once.
The playbooks run exactly as an operator runs them, against Molecule's inventory.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "default" / "tests"))

from support import gateway_config, get_host, hub_command, hub_db, sql, wait_for

REPO = Path(__file__).resolve().parents[3]
N = 40  # readings, one metric each
NEW_SERIAL = "MOL-GW-R"


def playbook(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """ansible-playbook from the repository, against this scenario's inventory."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    cmd = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"],
           str(REPO / "playbooks" / name), *args]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    print(p.stdout[-4000:], p.stderr[-2000:])
    return p


def collector_running(host) -> bool:  # type: ignore[no-untyped-def]
    """The collector program is RUNNING under supervisor (whatever the group is called)."""
    out = host.run("supervisorctl status").stdout
    return any(line.split()[0].endswith("collect") and line.split()[1] == "RUNNING"
               for line in out.splitlines() if line.strip())  # fmt: skip


def hub_rows(hub, serial: str) -> set[tuple]:  # type: ignore[no-untyped-def]
    rows = sql(hub, hub_db(hub), f"SELECT device, ts, metric, value FROM readings "  # noqa: S608 (the test's own values)
                                 f"WHERE serial = '{serial}'")  # fmt: skip
    return {(r["device"], r["ts"], r["metric"], r["value"]) for r in rows}


def test_backup_then_restore_onto_another_gateway(tmp_path: Path) -> None:
    gw_a, gw_b, hub = get_host("gw-a"), get_host("gw-b"), get_host("hub")

    # 1. gw-a collects N readings from its device and uploads them as MOL-GW-A
    base = int(time.time() * 1000)
    lines = "\n".join(json.dumps({"ts": base + i, "metrics": {"temp_c": i / 2}}) for i in range(N))
    pub = gw_a.run(
        f"printf '%s\\n' {shlex.quote(lines)} | mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 "
        "-u TH-A01 -P molecule-dev-a01-Kw2n -t fieldgate/TH-A01/readings -l"
    )
    assert pub.rc == 0, pub.stderr
    wait_for("gw-a's readings at the hub", lambda: len(hub_rows(hub, "MOL-GW-A")) == N)
    source = hub_rows(hub, "MOL-GW-A")

    # 2. backup.yml --check says what it would fetch and fetches nothing
    check_dir = tmp_path / "check"
    p = playbook("backup.yml", "--check", "--limit", "gw-a", "-e", f"backup_dir={check_dir}")
    assert p.returncode == 0
    assert "would fetch the store of site MOL-GW-A" in p.stdout
    assert not check_dir.exists()

    # 3. backup.yml fetches a verified snapshot while collection continues
    backups = tmp_path / "backups"
    p = playbook("backup.yml", "--limit", "gw-a", "-e", f"backup_dir={backups}")
    assert p.returncode == 0
    (snapshot,) = backups.glob("MOL-GW-A/*/data_store-MOL-GW-A-*.db")
    assert len(list(snapshot.parent.glob("site_config-MOL-GW-A-*.yaml"))) == 1
    sums = [p.name for p in snapshot.parent.glob("*.sha256")]
    subprocess.run(["sha256sum", "--check", "--quiet", *sums], cwd=snapshot.parent, check=True)

    # 4. a new serial without a PIN is refused before anything changes
    store_b = gateway_config(gw_b)["store"]["path"]
    p = playbook("restore.yml", "--limit", "gw-b", "-e", f"restore_file={snapshot}",
                 "-e", f"restore_serial={NEW_SERIAL}")  # fmt: skip
    assert p.returncode != 0
    assert "restore_pin" in p.stdout and "nothing was changed" in p.stdout
    assert gateway_config(gw_b)["site"]["serial"] == "MOL-GW-B"
    assert sql(gw_b, store_b, "SELECT value FROM meta WHERE key='site_serial'") == [
        {"value": "MOL-GW-B"}
    ]

    # 5. a damaged file is refused on the gateway before anything is stopped
    damaged = tmp_path / "data_store-MOL-GW-A-damaged.db"
    damaged.write_bytes(b"not a database" * 100)
    p = playbook("restore.yml", "--limit", "gw-b", "-e", f"restore_file={damaged}",
                 "-e", "restore_serial=MOL-GW-B")  # fmt: skip
    assert p.returncode != 0
    assert "is not an SQLite database" in p.stdout
    assert collector_running(gw_b)

    # 6. restore onto gw-b as a new site, with a PIN from the hub; the play waits for the backlog
    pin = hub_command(hub, "pin", "--serial", NEW_SERIAL).strip()
    p = playbook("restore.yml", "--limit", "gw-b", "-e", f"restore_file={snapshot}",
                 "-e", f"restore_serial={NEW_SERIAL}", "-e", f"restore_pin={pin}")  # fmt: skip
    assert p.returncode == 0
    assert pin not in p.stdout  # the one-time PIN is not echoed
    assert gateway_config(gw_b)["site"]["serial"] == NEW_SERIAL
    assert collector_running(gw_b)
    aside = gw_b.check_output("ls -d /var/lib/fieldgate/set-aside/*/data_store.db")
    assert aside.strip()

    # 7. the hub holds the same readings under the new serial, exactly once
    assert hub_rows(hub, NEW_SERIAL) == source
    count = sql(
        hub,
        hub_db(hub),
        f"SELECT COUNT(*) AS n FROM readings WHERE serial = '{NEW_SERIAL}'",  # noqa: S608 (the test's own values)
    )
    assert count == [{"n": N}]
