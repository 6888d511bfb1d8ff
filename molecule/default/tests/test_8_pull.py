"""Pull mode on a deployed gateway (docs/pull-mode.md): gw1 has the fieldgate_pull role's
timer. A repository of this working tree, with an inventory that names the scenario's hosts,
is pushed over SSH into a bare repository on gw1 (pull mode's URL there is a path: no
network beyond the test network). The timer's service runs twice: the second run changes
nothing, and the result is in gw1's status and, with the next heartbeat, at the hub.

Before the first run, things are changed by hand on gw1 that an idempotent run only reads in
the roles' probes (a supervisor program file and the arrival-stamp drop-in edited, a program
stopped, the service user taken out of group dialout): the first run must notice and repair
each of them."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import requests
import yaml
from support import FIELDGATE, get_host, group_vars, host_vars, run_state, wait_for

REPO = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
SCENARIO = "molecule/default"


def _site_repo(tmp: Path, checkout_dir: str) -> Path:
    """A git repository of the working tree (tracked and new files, not ignored ones) plus the
    inventory of this run: the scenario's group_vars and host_vars beside a hosts file, and
    the run's test network (what group_vars/all.yml reads) inside the checkout."""
    repo = tmp / "site"
    repo.mkdir()
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    archive = subprocess.run(
        ["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"],
        input=files, check=True, capture_output=True,
    ).stdout  # fmt: skip
    subprocess.run(["tar", "-C", str(repo), "-xf", "-"], input=archive, check=True)
    state = repo / SCENARIO / "pull-run/testhosts/state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps(run_state()))
    hosts = {
        "all": {
            "vars": {"molecule_ephemeral_directory": f"{checkout_dir}/{SCENARIO}/pull-run"},
            "children": {
                "gateways": {"hosts": {"gw1": {}, "gw2": {}}},
                "hubs": {"hosts": {"hub": {}}},
                "sensors": {"hosts": {"sensor": {}}},
            },
        }
    }
    (repo / SCENARIO / "inventory/pull-hosts.yml").write_text(yaml.safe_dump(hosts))
    git = ["git", "-C", str(repo), "-c", "user.name=molecule", "-c", "user.email=m@example.org"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "site"], check=True)
    return repo


# What the drift check edits on gw1 (tasks of the supervisor and mosquitto roles write them).
DRIFTED_FILES = (
    "/etc/supervisor/conf.d/fieldgate.conf",
    "/etc/mosquitto/conf.d/30-fieldgate-stamp.conf",
)
SERVICE_USER = "fieldgate"  # the fieldgate role's default fieldgate_user


def _program_states(gw) -> dict[str, str]:
    out = gw.run("supervisorctl status").stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}


def _drift(gw) -> tuple[dict[str, str], str]:
    """Change by hand what the probes read (gw1 has a Modbus RTU device: its service user is in
    group dialout); returns the files' contents before, and the program stopped."""
    before = {path: gw.file(path).content_string for path in DRIFTED_FILES}
    for path in DRIFTED_FILES:
        assert gw.run(f"echo '# edited by hand' >> {path}").rc == 0
    program = next(name for name in _program_states(gw) if name.endswith("collect"))
    assert gw.run(f"supervisorctl stop {program}").rc == 0
    assert _program_states(gw)[program] == "STOPPED"
    assert gw.run(f"gpasswd --delete {SERVICE_USER} dialout").rc == 0
    assert "dialout" not in gw.user(SERVICE_USER).groups
    return before, program


def _run_pull(gw) -> dict:
    run = gw.run("systemctl start fieldgate-pull.service")
    result = json.loads(gw.file("/var/lib/fieldgate/pull-result.json").content_string)
    journal = gw.run("journalctl -u fieldgate-pull --no-pager -n 60").stdout
    assert run.rc == 0 and result["result"] == "ok", f"{result}\n{run.stderr}\n{journal}"
    return result


def test_a_pull_run_changes_nothing_and_is_reported(tmp_path):
    gw = get_host("gw1")
    pull = host_vars("gw1")
    checkout = "/var/lib/fieldgate-pull/checkout"
    repo = _site_repo(tmp_path, checkout)
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert gw.run("git init -q --bare -b main %s", pull["fieldgate_pull_url"]).rc == 0
    state = run_state()
    ssh = f"ssh -i {state['ssh_key']} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    address = state["hosts"]["gw1"]["nets"]["mgmt"]
    subprocess.run(
        ["git", "-C", str(repo), "push", "-q", f"root@{address}:{pull['fieldgate_pull_url']}",
         "main"], env={**os.environ, "GIT_SSH_COMMAND": ssh}, check=True,
    )  # fmt: skip

    before, stopped = _drift(gw)
    started = time.monotonic()
    first = _run_pull(gw)
    first_secs = time.monotonic() - started
    assert first["commit"] == head and first["played"]
    # the probes noticed every change and the roles put each one right
    assert first["changed"] > 0
    for path, content in before.items():
        assert gw.file(path).content_string == content, path
    wait_for(f"{stopped} running again", lambda: _program_states(gw)[stopped] == "RUNNING")
    assert "dialout" in gw.user(SERVICE_USER).groups
    second = _run_pull(gw)
    assert second["changed"] == 0, second
    assert second["failed"] == 0 and second["hosts"] == ["gw1"]
    print(
        f"pull runs on gw1: first {first_secs:.0f} s (changed={first['changed']}), "
        f"second {second['duration_secs']:.0f} s (changed=0, ok={second['ok']})"
    )

    status = json.loads(gw.check_output(f"{FIELDGATE} status --json"))["pull"]
    assert status["state"] == "recorded"
    assert (status["result"], status["changed"], status["commit"]) == ("ok", 0, head)
    assert "pull run        ok, changed=0 in " in gw.check_output(f"{FIELDGATE} status")

    # the next heartbeat carries it to the hub
    hub_ip = state["hosts"]["hub"]["nets"]["mgmt"]
    admin = (group_vars("hubs")["hub_admin_user"], group_vars("hubs")["hub_admin_password"])
    serial = pull["fieldgate_serial"]

    def at_hub() -> dict | None:
        r = requests.get(f"http://{hub_ip}:8080/api/v1/gateways/{serial}", auth=admin, timeout=60)
        got = (r.json().get("status") or {}).get("pull") or {}
        return got if got.get("last_run") == status["last_run"] else None

    got = wait_for("the pull run in the heartbeat", at_hub)
    assert (got["result"], got["changed"]) == ("ok", 0)
    page = requests.get(f"http://{hub_ip}:8080/", auth=admin, timeout=60).text
    assert "pull ok, 0 changed, " in page

    # the timer stays installed for the next run
    assert gw.service("fieldgate-pull.timer").is_enabled
