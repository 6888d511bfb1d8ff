"""Benchmark: the cost of an idempotent ``site.yml`` for 1 and for N gateways and a hub.

Boots a hub and N (default 5) test gateways (systemd-nspawn, molecule/shared/testhosts.py,
their own network namespace) and converges the whole fleet once from fresh, then measures,
for a fleet of 1 gateway + the hub and for N gateways + the hub, in this order:

- baseline: the same two plays (hubs, then gateways) with the same inventory and
  ansible.cfg but an empty task list, facts gathered as site.yml gathers them: Ansible's
  fixed cost (start-up, inventory, SSH connection, fact gathering);
- ``site.yml`` again (idempotent: it must report changed=0, or the benchmark fails).

For each it prints the wall time, the control node's CPU seconds (user + system of every
process ansible-playbook started, from the children's rusage) and the hosts' CPU seconds
(each host's own cgroup, cpu.stat usage_usec), the ratio site.yml / baseline, and the
control-node and host CPU per added gateway ((N - 1) gateways between the two sizes;
target: control node <= 3 s). With --profile the tasks that took longest in the last
site.yml run are printed (ansible's profile_tasks callback).

Needs root (test hosts) and the offline bundle (the Molecule one, .work/molecule-bundle,
or --bundle-dir; missing parts are built). From the repository root:

    .venv/bin/python bench/converge/run.py [--gateways 5] [--profile] [--keep DIR]

--keep DIR keeps the hosts up in DIR afterwards and reuses them on the next run (the fresh
converge then only runs when DIR holds no converged fleet); `testhosts.py --run-dir
DIR/testhosts down` takes them down.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TESTHOSTS = REPO / "molecule/shared/testhosts.py"
PLAYBOOK = REPO / "playbooks/site.yml"
RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
)

# The baseline: site.yml's plays with nothing in them (the validation play gathers nothing,
# the hub and gateway plays gather facts as site.yml does).
EMPTY_PLAYS = [
    {"name": "Hub (no tasks)", "hosts": "hubs", "tasks": []},
    {"name": "Gateways (no tasks)", "hosts": "gateways", "tasks": []},
]


def inventory(state: dict, gateways: int, bundle: Path, glue: Path) -> dict:
    """An inventory of the hub and the first `gateways` gateways of the run."""
    hosts = state["hosts"]
    hub_ip = hosts["hub"]["address"]
    gws = {
        f"gw{i}": {
            "ansible_host": hosts[f"gw{i}"]["address"],
            "fieldgate_serial": f"BENCH-GW-{i:04d}",
            "fieldgate_devices": [
                {
                    "serial": f"TH-{i:04d}",
                    "alias": "temp",
                    "mqtt_password": f"bench-dev-{i}-Xq7p",
                }
            ],
        }
        for i in range(1, gateways + 1)
    }
    return {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": state["ssh_key"],
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null",
                "fieldgate_offline_bundle": True,
                "fieldgate_bundle_dir": str(bundle),
                "fieldgate_bundle_glue_dir": str(glue),
                "fieldgate_offline_bundle_dir": str(bundle),
                "fieldgate_glue_dir": str(glue),
                "fieldgate_wheel_build_dir": f"{bundle}/wheels",
                "fieldgate_bundle_architectures": ["amd64"],
            },
            "children": {
                "hubs": {
                    "hosts": {"hub": {"ansible_host": hub_ip}},
                    "vars": {
                        "hub_port": 8080,
                        "hub_admin_user": "bench-admin",
                        "hub_admin_password": "bench-admin-Lw4nT7",
                    },
                },
                "gateways": {
                    "hosts": gws,
                    "vars": {
                        "fieldgate_mqtt_password": "bench-collector-Vq3tX9",
                        "fieldgate_export_password": "bench-export-7hKp2w",
                        "fieldgate_upload_url": f"http://{hub_ip}:8080",
                        "fieldgate_led_type": "directory",
                        "fieldgate_led_path": "/var/lib/fieldgate/led-standin",
                    },
                },
            },
        }
    }


def host_cpu(state: dict) -> dict[str, float]:
    """CPU seconds each host has used since it booted (its own cgroup, every process in it)."""
    out = {}
    for name, h in state["hosts"].items():
        stat = Path(
            f"/sys/fs/cgroup/unified/fieldgate-testhost-{h['machine']}/cpu.stat"
        )
        if not stat.exists():
            stat = Path(f"/sys/fs/cgroup/fieldgate-testhost-{h['machine']}/cpu.stat")
        fields = dict(line.split() for line in stat.read_text().splitlines())
        out[name] = int(fields["usage_usec"]) / 1e6
    return out


def run_playbook(
    work: Path, inv: Path, playbook: Path, state: dict, env: dict, label: str
) -> dict:
    """Run one ansible-playbook; return wall, control-node CPU, host CPU and the recap."""
    before_cpu = host_cpu(state)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    log = work / f"{label}.log"
    with open(log, "w") as f:
        rc = subprocess.call(
            ["ansible-playbook", "-i", str(inv), str(playbook)],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after_cpu = host_cpu(state)
    text = log.read_text()
    if rc != 0:
        sys.exit(
            f"bench: {label} failed (exit {rc}); last lines of {log}:\n{text[-3000:]}"
        )
    recap = {
        m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3))}
        for m in map(RECAP.match, text.splitlines())
        if m
    }
    return {
        "wall": wall,
        "ctl_cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "host_cpu": sum(after_cpu[h] - before_cpu[h] for h in recap if h in after_cpu),
        "changed": sum(v["changed"] for v in recap.values()),
        "tasks": max(
            (v["ok"] for k, v in recap.items() if k.startswith("gw")), default=0
        ),
        "log": log,
    }


def profile_lines(log: Path, top: int) -> list[str]:
    """The slowest tasks, from profile_tasks' summary at the end of the log."""
    lines = log.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("=" * 20)), None)
    if start is None:
        return []
    return [ln for ln in lines[start + 1 :] if re.search(r" -+ \d+\.\d+s$", ln)][:top]


def mitogen_env(env: dict) -> dict:
    """The environment that runs a playbook with Mitogen's mitogen_linear strategy."""
    try:
        import ansible_mitogen
    except ImportError:
        sys.exit("bench: --mitogen needs Mitogen in this Python (pip install mitogen)")
    plugins = Path(ansible_mitogen.__file__).parent / "plugins/strategy"
    return {
        **env,
        "ANSIBLE_STRATEGY_PLUGINS": str(plugins),
        "ANSIBLE_STRATEGY": "mitogen_linear",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--gateways", type=int, default=5, help="the larger fleet (default 5)"
    )
    ap.add_argument("--bundle-dir", type=Path, default=REPO / ".work/molecule-bundle")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--sizes", default=None, help="fleet sizes to measure (default 1,N)"
    )
    ap.add_argument(
        "--mitogen", action="store_true",
        help="also run each site.yml with Mitogen's mitogen_linear strategy (PyPI mitogen)",
    )  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (the test hosts are systemd-nspawn containers)")
    n = args.gateways
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sorted({1, n})
    work = args.keep or Path(
        tempfile.mkdtemp(prefix="fieldgate-converge-", dir="/var/tmp")
    )
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "testhosts"
    env = dict(os.environ)
    env.update(
        HOME=str(work / "home"), ANSIBLE_HOME=str(work / "ansible"),
        ANSIBLE_LOCAL_TEMP=str(work / "ansible-tmp"), ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0", ANSIBLE_HOST_KEY_CHECKING="False",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )  # fmt: skip
    if args.profile:
        env["ANSIBLE_CALLBACKS_ENABLED"] = "ansible.posix.profile_tasks"
        env["PROFILE_TASKS_TASK_OUTPUT_LIMIT"] = "40"
    (work / "home").mkdir(exist_ok=True)
    glue = work / "glue"  # a snapshot: the code under test cannot change during the run
    if not glue.exists():
        subprocess.run(
            ["rsync", "-a", "--exclude", "__pycache__", "--exclude", "*.egg-info",
             "--exclude", ".pytest_cache", f"{REPO}/glue/", f"{glue}/"], check=True,
        )  # fmt: skip
    try:
        if not (run_dir / "state.json").exists():
            specs = ["hub:mgmt"] + [f"gw{i}:mgmt,sensor" for i in range(1, n + 1)]
            subprocess.run(
                [sys.executable, str(TESTHOSTS), "--run-dir", str(run_dir), "up", *specs],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        state = json.loads((run_dir / "state.json").read_text())
        invs = {}
        for size in sorted({*sizes, n}):
            invs[size] = work / f"inventory-{size}.yml"
            invs[size].write_text(
                yaml.safe_dump(inventory(state, size, args.bundle_dir, glue))
            )
        empty = work / "empty.yml"
        empty.write_text(yaml.safe_dump(EMPTY_PLAYS, sort_keys=False))
        print(
            f"bench: {n} gateways + hub up; load {Path('/proc/loadavg').read_text().strip()}"
        )
        marker = work / "converged"
        if not marker.exists():
            fresh = run_playbook(work, invs[n], PLAYBOOK, state, env, f"fresh-{n}")
            print(
                f"fresh site.yml, {n} gateways + hub: {fresh['wall']:.1f} s, control node "
                f"{fresh['ctl_cpu']:.1f} CPU-s, hosts {fresh['host_cpu']:.1f} CPU-s"
            )
            marker.write_text("")
        results = {}
        mitogen = {}
        for size in sizes:
            base = run_playbook(work, invs[size], empty, state, env, f"baseline-{size}")
            site = run_playbook(work, invs[size], PLAYBOOK, state, env, f"site-{size}")
            if args.mitogen:
                mitogen[size] = run_playbook(
                    work,
                    invs[size],
                    PLAYBOOK,
                    state,
                    mitogen_env(env),
                    f"mitogen-{size}",
                )
            load = Path("/proc/loadavg").read_text().split()[:3]
            if site["changed"]:
                sys.exit(f"bench: site.yml for {size} gateway(s) changed {site['changed']} "
                         f"things on its second run (see {site['log']})")  # fmt: skip
            results[size] = (base, site)
            print(f"\n{size} gateway(s) + hub (load {' '.join(load)}; "
                  f"{site['tasks']} tasks per gateway, changed=0)")  # fmt: skip
            print(f"  {'':26} {'wall s':>8} {'control CPU-s':>14} {'hosts CPU-s':>12}")
            rows = [("baseline (empty plays)", base), ("site.yml (idempotent)", site)]
            if size in mitogen:
                if mitogen[size]["changed"]:
                    sys.exit(f"bench: site.yml under Mitogen changed {mitogen[size]['changed']} "
                             f"things (see {mitogen[size]['log']})")  # fmt: skip
                rows.append(("site.yml, mitogen_linear", mitogen[size]))
            for label, r in rows:
                print(
                    f"  {label:26} {r['wall']:8.1f} {r['ctl_cpu']:14.1f} {r['host_cpu']:12.1f}"
                )
            for label, r in rows[1:]:
                print(
                    f"  ratio {label[:9]}{'/mitogen' if 'mitogen' in label else ''}/baseline".ljust(
                        27
                    )
                    + f"{r['wall'] / base['wall']:8.2f} {r['ctl_cpu'] / base['ctl_cpu']:14.2f} "
                    f"{r['host_cpu'] / max(base['host_cpu'], 0.01):12.2f}"
                )
            if size == 1:
                print(
                    f"  idempotent site.yml, 1 gateway + hub: {site['wall']:.1f} s (target <= 20 s)"
                )
            if args.profile:
                print("  slowest tasks:")
                for line in profile_lines(site["log"], 15):
                    print(f"    {line}")
        if len(results) >= 2:
            lo, hi = min(results), max(results)
            added = hi - lo
            (blo, slo), (bhi, shi) = results[lo], results[hi]
            print(f"\nper added gateway ({lo} -> {hi}):")
            print(f"  site.yml: wall {(shi['wall'] - slo['wall']) / added:.1f} s, control node "
                  f"{(shi['ctl_cpu'] - slo['ctl_cpu']) / added:.2f} CPU-s (target <= 3), hosts "
                  f"{(shi['host_cpu'] - slo['host_cpu']) / added:.2f} CPU-s")  # fmt: skip
            if len(mitogen) >= 2:
                mlo, mhi = mitogen[lo], mitogen[hi]
                print(f"  mitogen:  wall {(mhi['wall'] - mlo['wall']) / added:.1f} s, control node "
                      f"{(mhi['ctl_cpu'] - mlo['ctl_cpu']) / added:.2f} CPU-s, hosts "
                      f"{(mhi['host_cpu'] - mlo['host_cpu']) / added:.2f} CPU-s")  # fmt: skip
            print(f"  baseline: wall {(bhi['wall'] - blo['wall']) / added:.1f} s, control node "
                  f"{(bhi['ctl_cpu'] - blo['ctl_cpu']) / added:.2f} CPU-s, hosts "
                  f"{(bhi['host_cpu'] - blo['host_cpu']) / added:.2f} CPU-s")  # fmt: skip
        if 1 in results and len(results) >= 2:
            lo, hi = min(results), max(results)
            per_gw = (results[hi][1]["ctl_cpu"] - results[lo][1]["ctl_cpu"]) / (hi - lo)
            print("\nissue 17's targets:")
            print(f"  idempotent site.yml, 1 gateway + hub: {results[1][1]['wall']:.1f} s "
                  f"(target <= 20 s)")  # fmt: skip
            print(f"  control-node CPU per added gateway ({lo} -> {hi}): {per_gw:.2f} CPU-s "
                  f"(target <= 3)")  # fmt: skip
        print(f"\nload {Path('/proc/loadavg').read_text().strip()}")
    finally:
        if args.keep is None:
            subprocess.run(
                [sys.executable, str(TESTHOSTS), "--run-dir", str(run_dir), "down"],
                check=False,
            )
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench: hosts kept up in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
