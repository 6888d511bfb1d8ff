#!/usr/bin/python3
"""Boot systemd test hosts for fieldgate with systemd-nspawn, and take them down again.

Why this exists: this machine has no Docker, but systemd-nspawn boots a Debian 12 tree with
systemd as PID 1, which is what the roles expect on a gateway. One cached base tree
(debootstrap, built on first use) is shared read-only by every host through an overlayfs
mount, so a host costs a few milliseconds of disk work and 50-70 MiB of memory.

Topology of one run (run id RID, four hex digits, unique on the machine):

  network namespace fgth-RID  (nothing in it routes; traffic never leaves the machine)
    br-mgmt   10.213.X.0/24  management/uplink: control node (.1), every host's eth0
    br-sensor 10.214.X.0/24  sensor network: the gateways' eth1, the sensor host's eth1
  root namespace: only the veth fgRIDc (10.213.X.1/24) whose peer sits on br-mgmt, so
  Ansible/SSH from this machine reaches eth0 of every host; there is no route anywhere else.

A host may be of another architecture than this machine (`gw:mgmt,sensor:arm64`): its base
tree is debootstrapped for that architecture and its programs run through qemu-user-static,
which `up` registers with the kernel's binfmt_misc when it is not yet (mounting binfmt_misc
first). Emulated hosts run several times slower; the timeouts for them are longer. qemu-user
passes no netfilter calls to the kernel, so an emulated host's iptables programs are this
machine's native ones (see _native_netfilter); everything else in it is of its architecture.

Each host gets its interfaces from `--network-veth-extra` (host-side names we choose, at most
15 characters); the host-side ends are moved into the run's namespace and enslaved to the
bridges; addresses are configured from outside with nsenter, on every boot.

Commands (all take --run-dir DIR, the directory holding state.json, keys and overlays):
  base [--arch ARCH]            build or reuse the cached base tree, print its path
  up HOST:NET[,NET][:ARCH] ...  boot hosts (NET is mgmt or sensor; ARCH amd64 or arm64, default
                                this machine's), wait for SSH
  down                          stop everything of the run; idempotent, safe after failures
  restart HOST                  power the host off and boot it again (a reboot)
  wait-off HOST [--timeout S]   wait until the host has powered itself off (e.g. a UPS
                                shutdown inside it); fails when it is still running after S
  boot HOST                     boot a host that has powered itself off; refuses a running one
  exec HOST -- CMD ...          run a command inside a host (all its namespaces)
  status                        print state.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

CACHE_DIR = Path(os.environ.get("FIELDGATE_TESTHOSTS_CACHE", "/var/cache/fieldgate-testhosts"))
MIRROR = os.environ.get("FIELDGATE_TESTHOSTS_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# What every test host has before Ansible touches it: a systemd host reachable over SSH with
# Python (and python3-apt, which Ansible's apt module needs). Everything else the roles install
# from the offline bundle.
BASE_PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-apt",
    "openssh-server",
    "iproute2",
    "sudo",
    "procps",
]
# Bump when the post-processing of the base tree changes.
BASE_RECIPE = "3"
# Architectures a host can have (dpkg name -> the kernel's machine name, as in qemu-<machine>).
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
NATIVE = next((a for a, m in ARCHES.items() if m == platform.machine()), platform.machine())
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Seconds to wait for a host's sshd after boot and for its power-off: native, emulated.
SSH_WAIT = {True: 90.0, False: 600.0}
STOP_WAIT = {True: 20.0, False: 90.0}
# iptables' programs (every iptables*, ip6tables*, ebtables*, arptables* name links to one).
NETFILTER_PROGRAMS = ["/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi"]
NETS = {"mgmt": 213, "sensor": 214}
# Interface names inside a host: like a gateway with an uplink and a sensor port.
INNER_IF = {"mgmt": "eth0", "sensor": "eth1"}
SSH_OPTS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
]  # fmt: skip


class TestHostError(Exception):
    """A failure with one line of explanation for the operator."""


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays machine-readable."""
    print(f"testhosts: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing output; raise TestHostError with its stderr on failure."""
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if check and res.returncode != 0:
        raise TestHostError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


# --------------------------------------------------------------------------- base tree


def base_key(arch: str = "amd64") -> str:
    """A stamp over everything that shapes the base tree; a change means a rebuild."""
    parts = [SUITE, MIRROR, BASE_RECIPE, *sorted(BASE_PACKAGES)]
    if arch != "amd64":  # amd64 keeps the key it had before hosts had an architecture
        parts.append(arch)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _base_prefix(arch: str) -> str:
    """Name prefix of the arch's base trees (amd64's is the one from before architectures)."""
    return "base-" if arch == "amd64" else f"{arch}-base-"


def ensure_emulation(arch: str) -> None:
    """Make this machine run the arch's programs: qemu-user-static registered in binfmt_misc.

    Registered from the binfmt.d file qemu-user-static ships (with its F flag: the kernel
    opens the interpreter at registration, so it also runs inside the hosts' trees).
    """
    if arch == NATIVE:
        return
    machine = ARCHES[arch]
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    entry = BINFMT / f"qemu-{machine}"
    if not entry.exists():
        conf = Path(f"/usr/lib/binfmt.d/qemu-{machine}.conf")
        if not conf.exists():
            raise TestHostError(
                f"{arch} hosts need qemu-user-static ({conf} is missing): "
                "apt-get install qemu-user-static"
            )
        (BINFMT / "register").write_text(conf.read_text().strip())
        log(f"registered qemu-{machine} in {BINFMT}")
    text = entry.read_text()
    flags = next((ln.split()[1] for ln in text.splitlines() if ln.startswith("flags:")), "")
    if not text.startswith("enabled") or "F" not in flags:
        raise TestHostError(
            f"{entry} is not enabled with the F flag (flags {flags!r}): the hosts cannot reach "
            "the interpreter; remove it (echo -1 > the file) and run again"
        )


def ensure_base(arch: str = NATIVE) -> Path:
    """Return the cached base tree of arch, building it with debootstrap on first use.

    Builds into a temporary directory and renames it into place under a lock, so concurrent
    runs either wait for the build or reuse the finished tree, never a half-built one.
    """
    if arch not in ARCHES:
        raise TestHostError(f"unknown architecture {arch!r} ({', '.join(ARCHES)})")
    ensure_emulation(arch)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = base_key(arch)
    prefix = _base_prefix(arch)
    base = CACHE_DIR / f"{prefix}{key}"
    stamp = base / ".fieldgate-base-stamp"
    with (CACHE_DIR / ".lock").open("w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == key:
            return base
        tmp = CACHE_DIR / f"building-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.monotonic()
        took = "about a minute" if arch == NATIVE else "about 15 minutes, emulated"
        log(f"building base tree {base} with debootstrap (first use, {took})")
        run([
            "debootstrap", f"--arch={arch}", "--variant=minbase",
            "--include=" + ",".join(BASE_PACKAGES), SUITE, str(tmp), MIRROR,
        ])  # fmt: skip
        _prepare_base(tmp, emulated=arch != NATIVE)
        for old in CACHE_DIR.glob(f"{prefix}*"):
            if old != base:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)
        stamp.write_text(key + "\n")
        log(f"base tree built in {time.monotonic() - started:.0f} s")
        return base


def _prepare_base(root: Path, emulated: bool = False) -> None:
    """Turn a debootstrap tree into a bootable, closed-network test host template."""
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("")
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    units = root / "etc/systemd/system"
    # No console login, no background apt runs that would hold the dpkg lock during converge.
    for unit in ["console-getty.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                 "systemd-networkd-wait-online.service"]:  # fmt: skip
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    if emulated:
        # qemu-user cannot set up systemd's credentials directory ("Failed to set up
        # credentials: Invalid argument", status=243/CREDENTIALS): the units that would load
        # optional credentials (tmpfiles, sysctl, sysusers, ...) run without them.
        for unit in sorted((root / "lib/systemd/system").glob("*.service")):
            if "\nLoadCredential=" in unit.read_text():
                dropin = units / f"{unit.name}.d"
                dropin.mkdir(exist_ok=True)
                (dropin / "emulated.conf").write_text("[Service]\nLoadCredential=\n")
    # Each host gets its own SSH host keys on first boot.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (units / "testhost-sshkeys.service").write_text(
        "[Unit]\nDescription=Generate SSH host keys of a test host\n"
        "Before=ssh.service\nConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "testhost-sshkeys.service").symlink_to("../testhost-sshkeys.service")
    # A closed-network site: no internet apt source. The roles add the offline bundle's source.
    # Empty lists with an old mtime make Ansible's cache_valid_time refresh them.
    (root / "etc/apt/sources.list").write_text("")
    for f in (root / "etc/apt/sources.list.d").glob("*"):
        f.unlink()
    run(["chroot", str(root), "apt-get", "clean"])
    lists = root / "var/lib/apt/lists"
    for f in lists.iterdir():
        if f.is_file() and f.name != "lock":
            f.unlink()
    (root / "var/lib/apt/periodic/update-success-stamp").unlink(missing_ok=True)
    os.utime(lists, (0, 0))


# --------------------------------------------------------------------------- run state


class Run:
    """One set of hosts, described by <run-dir>/state.json."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir.resolve()
        self.state_file = self.dir / "state.json"
        self.state: dict = {}
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        tmp.rename(self.state_file)

    @property
    def rid(self) -> str:
        return self.state["run_id"]

    @property
    def netns(self) -> str:
        return f"fgth-{self.rid}"

    def ns(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside the run's network namespace."""
        return run(["ip", "netns", "exec", self.netns, *cmd], check=check)


def _pick_run_id() -> tuple[str, int]:
    """A run id and a /24 index not used by any netns or route on this machine."""
    routes = run(["ip", "-4", "route", "show", "table", "all"]).stdout
    spaces = set(run(["ip", "netns", "list"]).stdout.split())
    for _ in range(200):
        rid = f"{secrets.randbelow(16**4):04x}"
        idx = 1 + secrets.randbelow(254)
        if f"fgth-{rid}" in spaces:
            continue
        if any(f"10.{n}.{idx}." in routes for n in NETS.values()):
            continue
        return rid, idx
    raise TestHostError("no free run id / test subnet found")


def _run_id_lock() -> TextIO:
    """Hold the machine-wide lock of run ids and subnets until the returned file is closed."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    lockf = (CACHE_DIR / ".run-id.lock").open("w")
    fcntl.flock(lockf, fcntl.LOCK_EX)
    return lockf


def _ip(net: str, idx: int, host: int) -> str:
    return f"10.{NETS[net]}.{idx}.{host}"


# --------------------------------------------------------------------------- up


def cmd_up(run_: Run, specs: list[str], usb_hosts: list[str], binds: list[str]) -> None:
    """Create the network and boot every host; on any failure take everything down again."""
    if run_.state.get("hosts"):
        raise TestHostError(f"{run_.dir} already holds a run; call down first")
    parsed = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        nets, _, arch = rest.partition(":")
        parsed.append((name, [n for n in (nets or "mgmt").split(",") if n], arch or NATIVE))
    bases = {arch: str(ensure_base(arch)) for arch in sorted({p[2] for p in parsed})}
    run_.dir.mkdir(parents=True, exist_ok=True)
    # Runs started at the same moment (two Molecule runs or benchmarks on one machine) must not
    # pick the same id or subnet: the pick and the creation of what takes them (the namespace,
    # the control node's address and route) happen under one machine-wide lock.
    id_lock = _run_id_lock()
    rid, idx = _pick_run_id()
    run_.state = {
        "run_id": rid, "subnet_index": idx, "hosts": {},
        "control_ip": _ip("mgmt", idx, 1),
        "cidrs": {net: f"10.{n}.{idx}.0/24" for net, n in NETS.items()},
        "ssh_key": str(run_.dir / "ssh_key"), "binds": binds,
    }  # fmt: skip
    hosts = {}
    for i, (name, nets_l, arch) in enumerate(parsed):
        for n in nets_l:
            if n not in NETS:
                raise TestHostError(f"unknown network {n!r} in {specs[i]!r} (mgmt, sensor)")
        hosts[name] = {
            "machine": f"fg{rid}-{name}", "arch": arch, "base": bases[arch],
            "nets": {n: _ip(n, idx, 10 + i) for n in nets_l},
            "ifaces": {n: f"fg{rid}{i}{n[0]}" for n in nets_l},
            "usb": None, "pid": None, "leader": None,
        }  # fmt: skip
        hosts[name]["address"] = hosts[name]["nets"].get("mgmt") or next(
            iter(hosts[name]["nets"].values())
        )
    run_.state["hosts"] = hosts
    run_.save()
    try:
        try:
            _make_network(run_)
        finally:
            id_lock.close()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fieldgate-testhosts-{rid}",
             "-f", run_.state["ssh_key"]])  # fmt: skip
        for name in hosts:
            _prepare_host(run_, name, name in usb_hosts)
        for name in hosts:
            _boot(run_, name)
        for name in hosts:
            _wait_ssh(run_, name)
    except BaseException:
        log("bringing hosts up failed; taking the run down")
        cmd_down(run_)
        raise
    log(f"run {rid}: {len(hosts)} hosts up")


def _make_network(run_: Run) -> None:
    """The run's namespace with its bridges, and the control node's veth into br-mgmt."""
    ns = run_.netns
    run(["ip", "netns", "add", ns])
    run_.ns("ip", "link", "set", "lo", "up")
    for net in NETS:
        run_.ns("ip", "link", "add", f"br-{net}", "type", "bridge")
        run_.ns("ip", "link", "set", f"br-{net}", "up")
    ctl = f"fg{run_.rid}c"
    run(["ip", "link", "add", ctl, "type", "veth", "peer", "name", "ctl", "netns", ns])
    run(["ip", "addr", "add", f"{run_.state['control_ip']}/24", "dev", ctl])
    run(["ip", "link", "set", ctl, "up"])
    run_.ns("ip", "link", "set", "ctl", "master", "br-mgmt", "up")


def _host_dir(run_: Run, name: str) -> Path:
    return run_.dir / "hosts" / name


def _prepare_host(run_: Run, name: str, usb: bool) -> None:
    """Mount the host's overlay and put the run's key, a machine id and /etc/hosts in it."""
    h = run_.state["hosts"][name]
    hd = _host_dir(run_, name)
    for sub in ("upper", "work", "root"):
        (hd / sub).mkdir(parents=True, exist_ok=True)
    root = hd / "root"
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={h['base']},upperdir={hd / 'upper'},workdir={hd / 'work'}",
         str(root)])  # fmt: skip
    h["root"] = str(root)
    run_.save()
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    pub = Path(run_.state["ssh_key"] + ".pub").read_text()
    (ssh_dir / "authorized_keys").write_text(pub)
    (ssh_dir / "authorized_keys").chmod(0o600)
    machine_id = hashlib.md5(h["machine"].encode(), usedforsecurity=False).hexdigest()
    (root / "etc/machine-id").write_text(machine_id + "\n")
    (root / "etc/hostname").write_text(name + "\n")
    lines = ["127.0.0.1 localhost", f"127.0.1.1 {name}"]
    for other, oh in run_.state["hosts"].items():
        if other != name:
            lines.append(f"{oh['address']} {other}")
    (root / "etc/hosts").write_text("\n".join(lines) + "\n")
    if not _native(h):
        _native_netfilter(root, h["arch"])
    if usb:
        img = hd / "usb.img"
        with img.open("wb") as f:
            f.truncate(64 * 1024 * 1024)
        run(["mkfs.ext4", "-q", "-F", "-L", "FGEXPORT", str(img)])
        dev = run(["losetup", "--find", "--show", str(img)]).stdout.strip()
        h["usb"] = {"image": str(img), "device": dev}
        run_.save()


def _native_netfilter(root: Path, arch: str) -> None:
    """Give an emulated host this machine's own iptables programs, which run natively.

    qemu-user passes no netfilter call to the kernel: under it, Debian's iptables (nf_tables
    over netlink) fails with "Failed to initialize nft: Protocol not supported" and
    iptables-legacy (get/setsockopt) with "Table does not exist", so Shorewall refuses to
    start ("Your kernel/iptables do not include state match support"). The programs, their
    extensions and the libraries they load are copied from this machine into the host's
    multiarch directories, and a local dpkg diversion sends the files of the host's own
    iptables package (installed later from the bundle) to *.<arch> beside them.
    """
    multiarch = Path(f"/usr/lib/{platform.machine()}-linux-gnu")
    extensions = sorted((multiarch / "xtables").glob("*.so"))
    needed: set[str] = set()
    for path in [*NETFILTER_PROGRAMS, *map(str, extensions)]:
        for line in run(["ldd", path]).stdout.splitlines():
            parts = line.split()
            if "=>" in parts and parts[parts.index("=>") + 1].startswith("/"):
                needed.add(parts[parts.index("=>") + 1])
            elif parts and parts[0].startswith("/"):  # the dynamic loader
                needed.add(parts[0])
    if not (root / "lib64").exists():  # the loader's path (usrmerge: /lib64 -> usr/lib64)
        (root / "usr/lib64").mkdir(exist_ok=True)
        (root / "lib64").symlink_to("usr/lib64")
    for path in sorted(needed | {str(p) for p in extensions} | set(NETFILTER_PROGRAMS)):
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)  # follows symlinks: the file under the name asked for
    with (root / "var/lib/dpkg/diversions").open("a") as f:
        for prog in NETFILTER_PROGRAMS:
            f.write(f"{prog}\n{prog}.{arch}\n:\n")  # package ":" is a local diversion


def _nspawn_cmd(run_: Run, name: str) -> list[str]:
    h = run_.state["hosts"][name]
    cmd = [
        "systemd-nspawn", "--register=no", "--keep-unit", "--quiet",
        f"--directory={h['root']}", f"--machine={h['machine']}", f"--hostname={name}",
        "--boot", "--resolv-conf=off", "--console=passive", "--link-journal=no",
        "--timezone=off", "--bind=/dev/fuse",
    ]  # fmt: skip
    for net, ifname in h["ifaces"].items():
        cmd.append(f"--network-veth-extra={ifname}:{INNER_IF[net]}")
    if h["usb"]:
        cmd.append(f"--bind={h['usb']['device']}")
    for b in run_.state.get("binds", []):
        cmd.append(f"--bind-ro={b}")
    return cmd


# cgroup hierarchies a container's systemd manages (this machine: hybrid, v1 name=systemd + v2).
CGROUP_ROOTS = [
    Path("/sys/fs/cgroup/systemd"),
    Path("/sys/fs/cgroup/unified"),
    Path("/sys/fs/cgroup"),
]


def _cgroup_dirs(machine: str) -> list[Path]:
    """Where the host's own cgroup tree lives: one directory per writable hierarchy."""
    dirs = []
    for root in CGROUP_ROOTS:
        if (root / "cgroup.procs").exists() and os.access(root / "cgroup.procs", os.W_OK):
            dirs.append(root / f"fieldgate-testhost-{machine}")
    return dirs


def _enter_own_cgroup(dirs: list[Path]) -> None:
    """In the forked child, before exec: move into the host's own cgroups.

    systemd-nspawn --keep-unit splits the cgroup it starts in into supervisor/ and
    payload/. Started from a shared cgroup, every container would get the same payload/
    and their systemds would manage (and kill) each other's units.
    """
    for d in dirs:
        (d / "cgroup.procs").write_text(str(os.getpid()))


def _remove_cgroups(machine: str) -> None:
    """Remove the host's cgroup directories, deepest first (they must be empty of processes)."""
    for d in _cgroup_dirs(machine):
        if not d.is_dir():
            continue
        for sub, _dirs, _files in sorted(os.walk(d), key=lambda t: -t[0].count("/")):
            try:
                Path(sub).rmdir()
            except OSError as exc:
                log(f"cannot remove cgroup {sub}: {exc.strerror}")


def _boot(run_: Run, name: str) -> None:
    """Start systemd-nspawn detached, attach its veths to the bridges, set the addresses."""
    h = run_.state["hosts"][name]
    cgroups = _cgroup_dirs(h["machine"])
    for d in cgroups:
        d.mkdir(exist_ok=True)
    # the child has its own descriptor of the log: ours closes once it is started
    with (_host_dir(run_, name) / "nspawn.log").open("ab") as logf:
        # preexec_fn: nspawn must be in its own cgroup before it execs; this tool starts no
        # threads, so the fork cannot inherit a lock another thread holds
        proc = subprocess.Popen(
            _nspawn_cmd(run_, name), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            start_new_session=True, preexec_fn=lambda: _enter_own_cgroup(cgroups),  # noqa: PLW1509
        )  # fmt: skip
    h["pid"] = proc.pid
    h["leader"] = None
    run_.save()
    deadline = time.monotonic() + 30
    leader = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (_host_dir(run_, name) / "nspawn.log").read_text(errors="replace")[-800:]
            raise TestHostError(f"systemd-nspawn for {name} exited ({proc.returncode}): {tail}")
        leader = _leader_of(proc.pid)
        if leader and all(_link_exists(i) for i in h["ifaces"].values()):
            break
        time.sleep(0.05)
    else:
        raise TestHostError(f"{name}: container did not start within 30 s")
    h["leader"] = leader
    h["pidns"] = _pidns(leader)
    run_.save()
    for net, ifname in h["ifaces"].items():
        run(["ip", "link", "set", ifname, "netns", run_.netns])
        run_.ns("ip", "link", "set", ifname, "master", f"br-{net}", "up")
    inner = ["nsenter", "-t", str(leader), "-n"]
    run([*inner, "ip", "link", "set", "lo", "up"])
    for net, addr in h["nets"].items():
        dev = INNER_IF[net]
        run([*inner, "ip", "addr", "add", f"{addr}/24", "dev", dev])
        run([*inner, "ip", "link", "set", dev, "up"])


def _pidns(pid: int | str) -> str:
    """The PID namespace of a process (``pid:[4026531836]``); OSError when it is gone."""
    return str(Path(f"/proc/{pid}/ns/pid").readlink())


def _leader_of(nspawn_pid: int) -> int | None:
    """The container's PID 1 as seen from here: the child of nspawn in another PID namespace."""
    try:
        own = _pidns(nspawn_pid)
    except OSError:
        return None
    for task in Path(f"/proc/{nspawn_pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                if _pidns(kid) != own:
                    return int(kid)
            except OSError:
                continue
    return None


def _link_exists(ifname: str) -> bool:
    return Path(f"/sys/class/net/{ifname}").exists()


def _native(h: dict) -> bool:
    return h.get("arch", NATIVE) == NATIVE


def _wait_ssh(run_: Run, name: str, timeout: float | None = None) -> None:
    """Wait until sshd of the host accepts the run's key."""
    h = run_.state["hosts"][name]
    timeout = timeout or SSH_WAIT[_native(h)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((h["address"], 22), timeout=1):
                pass
        except OSError:
            time.sleep(0.1)
            continue
        res = subprocess.run(
            ["ssh", *SSH_OPTS, "-i", run_.state["ssh_key"], f"root@{h['address']}", "true"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if res.returncode == 0:
            return
        time.sleep(0.2)
    raise TestHostError(f"{name}: sshd at {h['address']} did not answer within {timeout:.0f} s")


# --------------------------------------------------------------------------- down


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _is_ours(pid: int, machine: str) -> bool:
    """True when pid is the systemd-nspawn process of this machine (guards against pid reuse)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"--machine={machine}".encode() in cmd


def pids_in_ns(pidns: str) -> list[int]:
    """Every process in the given PID namespace (a container's processes, seen from here)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if str((p / "ns/pid").readlink()) == pidns:
                found.append(int(p.name))
        except OSError:
            continue
    return found


def _signal_host(run_: Run, name: str) -> None:
    """Ask the host to power off: SIGTERM to its systemd-nspawn (if it is still ours)."""
    h = run_.state["hosts"][name]
    pid = h.get("pid")
    if not (pid and _alive(pid) and _is_ours(pid, h["machine"])):
        return
    leader = h.get("leader")
    if _native(h) or not (leader and _alive(leader)):
        os.kill(pid, signal.SIGTERM)
        return
    # qemu-user shifts real-time signals by two: nspawn's SIGRTMIN+4 (power off) reaches an
    # emulated systemd as SIGRTMIN+2 (emergency mode). Ask its systemd instead.
    subprocess.run(
        ["nsenter", "-t", str(leader), "-a", "--", "systemctl", "poweroff", "--no-block"],
        capture_output=True, check=False, timeout=120,
    )  # fmt: skip


def _stop_host(run_: Run, name: str, timeout: float | None = None) -> None:
    """Power the host off (SIGTERM to nspawn), escalating to SIGKILL of its PID namespace."""
    h = run_.state["hosts"][name]
    timeout = timeout or STOP_WAIT[_native(h)]
    pid = h.get("pid")
    _signal_host(run_, name)
    deadline = time.monotonic() + timeout
    while pid and _alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if pid and _alive(pid) and _is_ours(pid, h["machine"]):
        log(f"{name}: did not power off in {timeout:.0f} s, killing it")
        os.kill(pid, signal.SIGKILL)
    if h.get("pidns"):
        for _ in range(100):
            left = pids_in_ns(h["pidns"])
            if not left:
                break
            for p in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.1)
    if pid:
        _reap(pid)
    _remove_cgroups(h["machine"])
    h["pid"] = None
    h["leader"] = None
    h["pidns"] = None
    run_.save()


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# What is kept of a host before it is destroyed: failed units, the journal of this boot, and
# the tail of every log file under /var/log (the daemons' own logs live there, not in journald).
SAVE_LOGS_SCRIPT = (
    "systemctl --failed --no-pager; journalctl -b --no-pager -o short-iso; "
    "find /var/log -type f -name '*.log' -size +0 | sort | while read -r f; do "
    'echo; echo "==== $f (last 200 lines)"; tail -n 200 "$f"; done'
)


def save_journals(run_: Run, dest: Path) -> None:
    """Keep each running host's journal and failed units before it is destroyed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, h in run_.state.get("hosts", {}).items():
        leader = h.get("leader")
        if not (leader and _alive(leader)):
            continue
        inner = ["nsenter", "-t", str(leader), "-a", "--"]
        out = subprocess.run(
            [*inner, "sh", "-c", SAVE_LOGS_SCRIPT],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        (dest / f"{name}.journal").write_text(out.stdout + out.stderr)


def cmd_down(run_: Run, keep_dir: bool = False) -> None:
    """Remove every process, mount, loop device, veth and netns of the run. Idempotent."""
    if not run_.state:
        log(f"nothing to take down in {run_.dir}")
        return
    rid = run_.rid
    hosts = run_.state.get("hosts", {})
    for name in hosts:  # all power off in parallel, then each is waited for
        _signal_host(run_, name)
    for name in hosts:
        _stop_host(run_, name)
    for name, h in hosts.items():
        root = h.get("root")
        if root and os.path.ismount(root):
            res = run(["umount", root], check=False)
            if res.returncode != 0:
                log(f"{name}: umount busy, detaching lazily: {res.stderr.strip()}")
                run(["umount", "--lazy", root], check=False)
        usb = h.get("usb")
        if usb:
            attached = run(["losetup", "-j", usb["image"]], check=False).stdout
            for line in attached.splitlines():
                run(["losetup", "-d", line.split(":")[0]], check=False)
    if f"fgth-{rid}" in run(["ip", "netns", "list"]).stdout.split():
        run(["ip", "netns", "del", f"fgth-{rid}"])
    for link in Path("/sys/class/net").iterdir():
        if link.name.startswith(f"fg{rid}"):
            run(["ip", "link", "del", link.name], check=False)
    if not keep_dir:
        for name in hosts:
            shutil.rmtree(_host_dir(run_, name), ignore_errors=True)
        for f in ("ssh_key", "ssh_key.pub"):
            (run_.dir / f).unlink(missing_ok=True)
        run_.state = {}
        run_.state_file.unlink(missing_ok=True)
    log(f"run {rid} is down")


def cmd_restart(run_: Run, name: str) -> None:
    """Reboot one host: power off, boot the same overlay again, re-plumb, wait for SSH."""
    _host(run_, name)
    _stop_host(run_, name)
    _boot(run_, name)
    _wait_ssh(run_, name)


def _running(run_: Run, name: str) -> bool:
    """True while the host's systemd-nspawn is alive (a halt inside the host ends it)."""
    h = run_.state["hosts"][name]
    return bool(h.get("pid")) and _alive(h["pid"]) and _is_ours(h["pid"], h["machine"])


def _host(run_: Run, name: str) -> dict:
    if name not in run_.state.get("hosts", {}):
        raise TestHostError(f"no host {name!r} in {run_.dir}")
    return run_.state["hosts"][name]


def cmd_wait_off(run_: Run, name: str, timeout: float) -> None:
    """Wait until the host has powered itself off (its systemd-nspawn has exited)."""
    _host(run_, name)
    deadline = time.monotonic() + timeout
    while _running(run_, name):
        if time.monotonic() > deadline:
            raise TestHostError(f"{name} is still running after {timeout:.0f} s")
        _reap(run_.state["hosts"][name]["pid"])
        time.sleep(0.1)


def cmd_boot(run_: Run, name: str) -> None:
    """Boot a host that powered itself off: clear what is left of it, boot, wait for SSH."""
    _host(run_, name)
    if _running(run_, name):
        raise TestHostError(f"{name} is running; 'restart' reboots a running host")
    _stop_host(run_, name)  # nothing left to stop: reaps, clears its cgroups and state
    _boot(run_, name)
    _wait_ssh(run_, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("base").add_argument("--arch", default=NATIVE, choices=sorted(ARCHES))
    p_up = sub.add_parser("up")
    p_up.add_argument("hosts", nargs="+", metavar="HOST:NET[,NET]")
    p_up.add_argument("--usb", action="append", default=[], metavar="HOST")
    p_up.add_argument("--bind-ro", action="append", default=[], metavar="PATH[:DEST]")
    p_down = sub.add_parser("down")
    p_down.add_argument("--save-journals", type=Path, default=None, metavar="DIR")
    p_down.add_argument("--keep-dir", action="store_true")
    p_re = sub.add_parser("restart")
    p_re.add_argument("host")
    p_wo = sub.add_parser("wait-off")
    p_wo.add_argument("host")
    p_wo.add_argument("--timeout", type=float, default=300)
    sub.add_parser("boot").add_argument("host")
    p_ex = sub.add_parser("exec")
    p_ex.add_argument("host")
    p_ex.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("status")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so a half-made run is taken down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.cmd == "base":
            print(ensure_base(args.arch))
            return 0
        if args.run_dir is None:
            raise TestHostError("--run-dir is required")
        run_ = Run(args.run_dir)
        if args.cmd == "up":
            cmd_up(run_, args.hosts, args.usb, args.bind_ro)
            print(json.dumps(run_.state, indent=2))
        elif args.cmd == "down":
            if args.save_journals and run_.state:
                save_journals(run_, args.save_journals)
            cmd_down(run_, keep_dir=args.keep_dir)
        elif args.cmd == "restart":
            cmd_restart(run_, args.host)
        elif args.cmd == "wait-off":
            cmd_wait_off(run_, args.host, args.timeout)
        elif args.cmd == "boot":
            cmd_boot(run_, args.host)
        elif args.cmd == "exec":
            h = run_.state["hosts"][args.host]
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            return subprocess.call(["nsenter", "-t", str(h["leader"]), "-a", "--", *command])
        elif args.cmd == "status":
            print(json.dumps(run_.state, indent=2))
    except TestHostError as exc:
        print(f"testhosts: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
