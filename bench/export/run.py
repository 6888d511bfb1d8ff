"""Benchmark: ``fieldgate export`` against ``cp`` + sync of the store, under live ingest, on
ext4, FAT through FUSE (fusefat) and exFAT through FUSE (exfat-fuse), in one run.

Builds a store of about ``--size-mb`` MB (default 500) and starts ingest at about
``--rate`` readings/s (default 1,000) in another process that writes the store directly
with the collector's commit pattern (small transactions, ``synchronous=FULL``). Then, for
each filesystem, on a fresh image on a loop device, it times with cold caches:

- ``cp`` of the database file, then the sync that puts it on the device: ``fsync`` of the
  copy and, under FUSE, ``fdatasync`` of the block device the driver writes through
  (fusefat does not pass ``fsync`` on; without it the copy sits in the device's cache);
- the export as a gateway runs it: ``usb-watch`` is a resident daemon (supervisor starts it
  at boot), so the export is :func:`fieldgate.export.export_to` called in a process that
  has already imported fieldgate and read its configuration, the snapshot in a forked
  child exactly as ``usb-watch`` forks it (``isolate=True``, the drive's device passed for
  FUSE): snapshot, sync, read-back from the device and comparison with what was written,
  site config, checksum file, renames. Timed from the request to the returned result,
  fork and child included. ``--path cli`` times ``fieldgate export --to`` instead (a new
  Python process from cold caches, as an operator running the command by hand waits for).

Each filesystem gets ``--repeat`` pairs (default 3) of cp + sync and export, one after
the other on the same drive (the previous export removed first); the pair with the median
ratio export / (cp + sync) (target: <= 1.3) is reported with its steps, beside every
pair's ratio, what the writer committed meanwhile and the load average (the machine is
shared, and one pair moves by +-0.4 at load 5-15).
Needs root (loop devices, mounts, dropping the page cache). From the repository root:

    .venv/bin/python bench/export/run.py [--size-mb 500] [--rate 1000] [--workdir DIR]
        [--fs ext4,vfat,exfat] [--verify readback] [--path resident|cli] [--repeat 3]

Mounting the drive, reading ``Password.txt`` and unmounting are outside both timings
(``cp`` needs a mounted drive too).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from fieldgate import store

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
SERIAL = "GW-BENCH"
BYTES_PER_ROW = 110  # measured: readings with their two indexes (686 MB at 80)
FILESYSTEMS = ("ext4", "vfat", "exfat")
LABELS = {
    "ext4": "ext4 (kernel)",
    "vfat": "FAT (fusefat)",
    "exfat": "exFAT (exfat-fuse)",
}

WRITER = """
import json, signal, sys, time
from fieldgate import store
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
conn = store.open_store(sys.argv[1], sys.argv[2])
rate, batch = float(sys.argv[3]), 50
period = batch / rate
t0, i, longest, commits = 1_800_000_000_000, 0, 0.0, 0
print("ready", flush=True)
while not stop:
    started = time.monotonic()
    with store.transaction(conn):
        store.insert_readings(
            conn, [("LIVE-1", t0 + (i + k) * 1000, "temperature", 21.5) for k in range(batch)],
            source="bench",
        )
    longest = max(longest, time.monotonic() - started)
    commits += 1
    i += batch
    time.sleep(max(0.0, period - (time.monotonic() - started)))
print(json.dumps({"rows": i, "commits": commits, "longest_commit_s": round(longest, 4)}))
"""


RESIDENT = """
import json, resource, sys, time
from fieldgate.config import load_config
from fieldgate.export import export_to

def cpu():
    return sum(
        r.ru_utime + r.ru_stime
        for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )

cfg = load_config(sys.argv[1])
log = open(sys.argv[2], "a+", buffering=1)  # the forked child notes its steps here too
print("ready", flush=True)
for line in sys.stdin:
    target, device = line.split()
    log.truncate(0)
    begun, used = time.monotonic(), cpu()
    note = lambda text: log.write(f"{time.monotonic() - begun:.3f} {text}\\n")
    export_to(cfg, target, note=note, isolate=True, device=device)
    secs, used = time.monotonic() - begun, cpu() - used
    log.seek(0)
    lines = log.read().splitlines()
    print(json.dumps({"secs": secs, "cpu": used, "lines": lines}), flush=True)
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def build_store(db: Path, size_mb: int) -> None:
    """Readings of 50 devices x 4 metrics, one a minute, until the file is about size_mb."""
    rows = size_mb * 1024 * 1024 // BYTES_PER_ROW
    conn = store.open_store(db, SERIAL)
    devices = [f"TH-{i:03d}" for i in range(50)]
    metrics = ["temperature", "humidity", "pressure", "battery"]
    per_ts = len(devices) * len(metrics)
    t0 = 1_767_225_600_000
    chunk = 500_000
    for start in range(0, rows, chunk):
        batch = []
        for i in range(start, min(rows, start + chunk)):
            step, k = divmod(i, per_ts)
            dev, m = divmod(k, len(metrics))
            batch.append(
                (
                    devices[dev],
                    t0 + step * 60_000,
                    metrics[m],
                    round(20 + i % 997 * 0.013, 3),
                )
            )
        with store.transaction(conn):
            store.insert_readings(conn, batch, source="bench")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def drop_caches() -> None:
    """Start every timing from the disk, not from the page cache."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mounted(point: Path) -> bool:
    text = Path("/proc/self/mountinfo").read_text()
    return any(line.split()[4] == str(point) for line in text.splitlines())


@contextlib.contextmanager
def drive(work: Path, fstype: str, size: int) -> Iterator[tuple[str, Path]]:
    """A fresh ``fstype`` image of ``size`` bytes on a loop device, mounted as usb-watch
    mounts it where the kernel has no vfat/exFAT: (device, mount point)."""
    image = work / f"{fstype}.img"
    with image.open("wb") as f:
        f.truncate(size)
    point = work / f"drive-{fstype}"
    point.mkdir()
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    fuse: subprocess.Popen[bytes] | None = None
    try:
        if fstype == "ext4":
            sh("mkfs.ext4", "-q", "-F", loop)
            sh("mount", "-t", "ext4", loop, str(point))
        elif fstype == "vfat":
            sh("mkfs.vfat", "-F", "32", loop)
            fuse = subprocess.Popen(
                [
                    "fusefat",
                    "-f",
                    "-o",
                    f"rw+,fsname={loop},subtype=fusefat",
                    loop,
                    str(point),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 15
            while not mounted(point):
                if time.monotonic() > deadline or fuse.poll() is not None:
                    raise RuntimeError("fusefat did not mount")
                time.sleep(0.05)
        else:
            sh("mkfs.exfat", loop)
            sh("mount.exfat-fuse", loop, str(point))
        yield loop, point
    finally:
        subprocess.run(["umount", str(point)], check=False)
        if fuse is not None:
            try:
                fuse.wait(600)  # fusefat writes its tables out after the unmount
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
        subprocess.run(["losetup", "-d", loop], check=False)
        image.unlink()
        point.rmdir()


def cpu_seconds() -> float:
    """CPU seconds of the finished child processes and of this one (user + system)."""
    total = 0.0
    for who in (resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def timed_copy(
    db: Path, point: Path, loop: str, fuse: bool
) -> tuple[float, float, float]:
    """``cp`` of the store, then the sync that puts the copy on the device: both times and
    the CPU seconds of both."""
    drop_caches()
    copy = point / "plain.db"
    cpu = cpu_seconds()
    started = time.monotonic()
    subprocess.run(["cp", str(db), str(copy)], check=True)
    copied = time.monotonic() - started
    subprocess.run(["sync", str(copy)], check=True)
    if fuse:
        fd = os.open(loop, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    synced = time.monotonic() - started
    cpu = cpu_seconds() - cpu
    copy.unlink()
    subprocess.run(["sync"], check=True)
    return copied, synced, cpu


def log_time(line: str) -> float | None:
    """The wall-clock time of a log line (``2026-12-05 23:30:12,669 INFO ...``)."""
    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


def timed_export(
    config: Path, target: Path
) -> tuple[float, float, list[str], tuple[float, float]]:
    """Run ``fieldgate export`` (a new process): its time, CPU seconds, the step lines it
    logged, and the seconds from the process's start to its first log line (the
    interpreter, imports and configuration, from cold caches) and from the first to the
    last log line."""
    drop_caches()
    env = {"FIELDGATE_CONFIG": str(config), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    cpu = cpu_seconds()
    wall_start = time.time()
    started = time.monotonic()
    p = subprocess.run(
        [FIELDGATE, "export", "--to", str(target)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    secs = time.monotonic() - started
    cpu = cpu_seconds() - cpu
    lines = p.stderr.splitlines()
    steps = [line.split(": ", 1)[-1] for line in lines if " in " in line]
    stamps = [t for t in map(log_time, lines) if t is not None]
    phases = (stamps[0] - wall_start, stamps[-1] - stamps[0]) if stamps else (0.0, 0.0)
    return secs, cpu, steps, phases


class Resident:
    """A process like ``usb-watch``: fieldgate imported and the configuration read once;
    each request is one :func:`fieldgate.export.export_to` with the forked child."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RESIDENT,
                str(config),
                str(config.with_suffix(".log")),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the resident exporter did not start")

    def export(
        self, target: Path, device: str
    ) -> tuple[float, float, list[str], tuple[float, float]]:
        """Export with cold caches: time, CPU seconds (the process and its forked child),
        step lines, and (request to the first step, first to last step) in seconds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        drop_caches()
        self.proc.stdin.write(f"{target} {device}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the resident exporter failed (exit {self.proc.wait()})"
            )
        r = json.loads(line)
        stamps = [float(text.split(" ", 1)[0]) for text in r["lines"]]
        steps = [t.split(" ", 1)[1] for t in r["lines"] if " in " in t]
        phases = (stamps[0], stamps[-1] - stamps[0]) if stamps else (0.0, 0.0)
        return r["secs"], r["cpu"], steps, phases

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(60)


def checksums_ok(target: Path) -> bool:
    return all(
        subprocess.run(
            ["sha256sum", "-c", p.name], cwd=p.parent, capture_output=True, check=False
        ).returncode
        == 0
        for p in target.glob("export-*.sha256")
    )


def write_config(path: Path, db: Path, secrets: Path, verify: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "site": {"serial": SERIAL},
                "store": {"path": str(db)},
                "export": {
                    "password_file": str(secrets / "export_password"),
                    "led_path": None,
                    "verify": verify,
                },
            }
        )
    )
    return path


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500, help="store size to build (MB)")
    ap.add_argument(
        "--rate", type=float, default=1000, help="ingest readings per second"
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the store and images go"
    )
    ap.add_argument("--fs", default=",".join(FILESYSTEMS), help="filesystems, in order")
    ap.add_argument("--verify", default="readback", help="export.verify for the export")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="cp + sync / export pairs per filesystem, one after the other; the pair "
        "with the median ratio is reported",
    )
    ap.add_argument(
        "--path",
        choices=("resident", "cli"),
        default="resident",
        help="the export in a resident process as usb-watch runs it (default), "
        "or fieldgate export --to as a new process",
    )
    args = ap.parse_args()
    filesystems = [f for f in args.fs.split(",") if f]
    unknown = set(filesystems) - set(FILESYSTEMS)
    if unknown:
        ap.error(
            f"unknown filesystems {sorted(unknown)} (known: {', '.join(FILESYSTEMS)})"
        )

    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-export-", dir=args.workdir))
    writer: subprocess.Popen[str] | None = None
    resident: Resident | None = None
    results: dict[str, dict] = {}
    try:
        db = work / "data_store.db"
        t = time.monotonic()
        build_store(db, args.size_mb)
        size = db.stat().st_size
        print(
            f"store: {size / 1e6:.0f} MB built in {time.monotonic() - t:.0f} s",
            flush=True,
        )
        secrets = work / "secrets"
        secrets.mkdir()
        (secrets / "export_password").write_text("bench\n")
        config = write_config(work / "config.yaml", db, secrets, args.verify)

        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), SERIAL, str(args.rate)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(2)  # ingest settles
        if args.path == "resident":
            resident = Resident(config)
        load_before = load()

        for fstype in filesystems:
            pairs: list[dict] = []
            with drive(work, fstype, 3 * size + (256 << 20)) as (loop, point):
                for rep in range(args.repeat):
                    copied, synced, copy_cpu = timed_copy(
                        db, point, loop, fuse=fstype != "ext4"
                    )
                    target = point / f"export-{rep}"
                    target.mkdir()
                    if resident is not None:
                        secs, export_cpu, steps, phases = resident.export(target, loop)
                    else:
                        secs, export_cpu, steps, phases = timed_export(config, target)
                    pairs.append(
                        {
                            "cp": copied,
                            "cp_sync": synced,
                            "cp_cpu": copy_cpu,
                            "export": secs,
                            "export_cpu": export_cpu,
                            "steps": steps,
                            "phases": phases,
                            "ratio": secs / synced,
                            "ok": checksums_ok(target),
                        }
                    )
                    shutil.rmtree(target)  # room for the next pair
                    r = pairs[-1]
                    print(
                        f"{LABELS[fstype]:<20} cp {r['cp']:6.2f} s   cp + sync "
                        f"{r['cp_sync']:6.2f} s   export {r['export']:6.2f} s   "
                        f"ratio {r['ratio']:5.2f}   load {load()}",
                        flush=True,
                    )
            # the pair with the median ratio stands for the filesystem
            results[fstype] = sorted(pairs, key=lambda r: r["ratio"])[len(pairs) // 2]
            results[fstype]["all_ok"] = all(r["ok"] for r in pairs)
            results[fstype]["ratios"] = [r["ratio"] for r in pairs]

        if resident is not None:
            resident.close()
            resident = None
        writer.send_signal(signal.SIGTERM)
        out, _ = writer.communicate(timeout=60)
        report = json.loads(out.strip().splitlines()[-1])
        writer = None
        print()
        print(
            f"store {size / 1e6:.0f} MB; images on the same disk as the store, loop devices"
        )
        print(
            f"ingest meanwhile: {report['rows']} rows in {report['commits']} commits at "
            f"{args.rate:.0f} rows/s, longest commit {report['longest_commit_s'] * 1000:.0f} ms"
        )
        print(f"load average before / after: {load_before} / {load()}")
        print(
            f"the pair with the median ratio of {args.repeat} per filesystem "
            f"(export: {args.path}); ratio = export / (cp + sync), target <= 1.3"
        )
        print(
            f"{'filesystem':<20} {'cp':>7} {'cp + sync':>10} {'export':>8} {'ratio':>6}   "
            "CPU-s cp + sync / export (processes, not the kernel's writeback threads);"
            " every pair's ratio"
        )
        for fstype, r in results.items():
            print(
                f"{LABELS[fstype]:<20} {r['cp']:7.2f} {r['cp_sync']:10.2f} {r['export']:8.2f} "
                f"{r['ratio']:6.2f}   {r['cp_cpu']:.2f} / {r['export_cpu']:.2f};"
                f"   {' '.join(f'{x:.2f}' for x in r['ratios'])}"
            )
        for fstype, r in results.items():
            start, steps_secs = r["phases"]
            first = (
                "request to its first step"
                if args.path == "resident"
                else "process start to its first log line"
            )
            print(
                f"{LABELS[fstype]}: export steps ({args.path}, verify: {args.verify}); "
                f"{first} {start:.2f} s, first to last step {steps_secs:.2f} s "
                f"(ratio of that part alone {steps_secs / r['cp_sync']:.2f})"
            )
            for step in r["steps"]:
                print(f"    {step}")
        ok = all(r["all_ok"] for r in results.values())
        print(
            f"sha256sum -c of every export: {'OK' if ok else 'FAILED'}   (target: ratio <= 1.3)"
        )
        return 0 if ok else 1
    finally:
        if resident is not None:
            resident.proc.kill()
            resident.proc.wait()
        if writer is not None:
            writer.kill()
            writer.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
