"""Benchmark: the hub's ingest on both backends against today's (main's) SQLite hub, a
retention pass during ingest, a 7-day bucketed query, and where the hub's CPU goes per row.

In one run, on loopback with real processes:

1. **Ingest.** G gateways (default 4) of R readings each (default 250,000: 50 devices x 4
   metrics, one sample a minute) have their batches cut beforehand (the gateway's own
   cutter, ``upload.batch_max_rows``); then G ``fieldgate upload --once`` processes send
   them at the same time (the real uploader: POST manifest, PUT zip) to ``fieldgate hub
   serve``: first the hub of the git ref ``--ref`` (default main) on SQLite, then this
   tree's hub on SQLite and on PostgreSQL 15 (a durable server started here, fsync on).
   Prints rows/s (G x R / wall time from the uploaders' start to the last one's exit),
   and the ratio this SQLite / main's SQLite (target >= 1.0) and PostgreSQL's rate
   (target >= 50,000 rows/s). The hub's count is checked to be exact.
2. **Retention during ingest** (this tree, both backends): the same ingest again (new
   gateways) while ``fieldgate hub prune`` deletes 1,000,000 old readings.
3. **Bucketed query.** 7 days of 1 Hz readings of one device and metric (604,800, beside a
   second series as large), ``GET /api/v1/readings?…&every=60`` over the 7 days (10,080
   buckets): first and median of 5 (target <= 1 s).
4. **CPU per row** (in process): one 250,000-row batch zip taken apart stage by stage:
   unzip + SHA-256, + CSV parse and checks (``BatchZip.table()``, pyarrow, as the hub
   parses an upload), + ingest of that Table into each backend (PostgreSQL's own CPU read
   from /proc for its backend process).

Run from the repository root (as root: PostgreSQL runs as the postgres user):

    .venv/bin/python bench/hub/run.py [--gateways 4] [--rows 250000] [--ref main] [--ingest-only]

The hub CPU printed for an ingest is its processes' (its start included), not the
registration commands the bench runs before the uploads.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
import yaml
from fieldgate import batches, batchfile, store
from fieldgate.config import load_config
from fieldgate.hub.backends import open_storage
from fieldgate.hub.passwords import hash_password

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "glue" / "tests"))
import pgserver  # the tests' PostgreSQL helper

PYTHON = sys.executable
FIELDGATE = str(Path(PYTHON).with_name("fieldgate"))
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DEVICES = [f"TH-{i:03d}" for i in range(50)]
METRICS = ["temperature", "humidity", "pressure", "battery"]
DAY = 86_400_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: the hub did not start on port {port}")


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if p.returncode != 0:
        raise SystemExit(
            f"bench: {' '.join(cmd[:4])} failed: {p.stderr.strip()[-800:]}"
        )
    return p


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu(pid: int, *, children: bool = False) -> float:
    """CPU seconds of a process (and of its children it has waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


# ---- gateways ------------------------------------------------------------------------------


def readings(rows: int, t0: int = T0) -> Iterator[store.Reading]:
    per_ts = len(DEVICES) * len(METRICS)
    for i in range(rows):
        step, k = divmod(i, per_ts)
        dev, m = divmod(k, len(METRICS))
        yield (
            DEVICES[dev],
            t0 + step * 60_000,
            METRICS[m],
            round(20 + (i % 997) * 0.013, 3),
        )


def make_gateway(root: Path, serial: str, rows: int, batch_rows: int, t0: int) -> Path:
    """A gateway directory: config, store with ``rows`` readings, its batches cut."""
    root.mkdir(parents=True)
    cfg_path = root / "fieldgate.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "site": {"serial": serial},
                "store": {"path": str(root / "store.db")},
                "upload": {
                    "url": "http://127.0.0.1:9",
                    "key_file": str(root / "gateway_key"),
                    "batch_max_rows": batch_rows,
                    "pending_dir": str(root / "pending"),
                    "uploaded_dir": str(root / "uploaded"),
                    "timeout_secs": 600,
                },
                "log": {"level": "WARNING"},
            }
        )
    )
    (root / "gateway_key").write_text("not-registered\n")
    (root / "gateway_key").chmod(0o600)
    conn = store.open_store(root / "store.db", serial)
    with store.transaction(conn):
        store.insert_readings(conn, readings(rows, t0), source="bench")
    cfg = load_config(str(cfg_path))
    batches.cut_all(conn, cfg)
    conn.close()
    return cfg_path


def point_at(cfg_path: Path, url: str) -> None:
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["upload"]["url"] = url
    cfg_path.write_text(yaml.safe_dump(cfg))


# ---- hubs ----------------------------------------------------------------------------------


class HubProc:
    """A ``fieldgate hub serve`` of this tree, or of another tree (``src``: its glue/src)."""

    def __init__(self, root: Path, db: str, src: Path | None, extra: list[str]) -> None:
        self.root, self.db, self.src, self.extra = root, db, src, extra
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cmd(self, *args: str) -> list[str]:
        if self.src is None:
            return [FIELDGATE, "hub", *args]
        code = "import sys; from fieldgate.cli import main; sys.exit(main())"
        return [PYTHON, "-c", code, "hub", *args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src)
        return env

    def start(self) -> None:
        self.log = (self.root / "hub.log").open("ab")
        args = [
            "serve",
            "--db",
            self.db,
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.extra,
        ]
        self.proc = subprocess.Popen(
            self.cmd(*args), stdout=self.log, stderr=subprocess.STDOUT, env=self.env()
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()

    def register(self, cfg_path: Path, serial: str) -> None:
        pin = run(
            self.cmd("pin", "--db", self.db, "--serial", serial), env=self.env()
        ).stdout
        point_at(cfg_path, self.url)
        run([FIELDGATE, "--config", str(cfg_path), "register", "--pin", pin.strip()])

    def count(self) -> int:
        from support import query_db

        return int(query_db(self.db, "SELECT COUNT(*) FROM readings")[0][0])


def ingest(
    hub: HubProc, gateways: list[tuple[Path, str]], work: Path
) -> tuple[float, float, float]:
    """Copy the pre-cut gateways, register them, send everything at once; (seconds, the
    uploaders' CPU seconds, the CPU seconds of the registration commands)."""
    cpu_reg = children_cpu()
    configs = []
    for template, serial in gateways:
        gw = work / template.name
        shutil.copytree(template, gw)
        cfg = gw / "fieldgate.yaml"
        cfg.write_text(cfg.read_text().replace(str(template), str(gw)))
        hub.register(cfg, serial)
        configs.append(cfg)
    cpu0 = children_cpu()
    registration = cpu0 - cpu_reg
    t = time.perf_counter()
    procs = [
        subprocess.Popen(
            [FIELDGATE, "--config", str(c), "upload", "--once"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for c in configs
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"bench: an uploader failed: {err.decode()[-800:]}")
    elapsed = time.perf_counter() - t
    uploaders = children_cpu() - cpu0
    return elapsed, uploaders, registration


def pg_cpu(server: pgserver.PgServer) -> float:
    """CPU seconds the PostgreSQL server's processes used (exited backends included)."""
    assert server.proc is not None
    main = int((server.data / "postmaster.pid").read_text().split()[0])
    total = proc_cpu(main, children=True)
    for child in Path(f"/proc/{main}/task/{main}/children").read_text().split():
        try:
            total += proc_cpu(int(child))
        except FileNotFoundError:
            pass
    return total


# ---- the bench -----------------------------------------------------------------------------


def extract_ref(ref: str, into: Path) -> Path:
    """The glue sources of a git ref (its hub is the baseline)."""
    raw = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "glue/src"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(into, filter="data")
    return into / "glue" / "src"


def timed(f: Callable[[], Any]) -> tuple[float, float, Any]:
    t, c = time.perf_counter(), time.process_time()
    out = f()
    return time.perf_counter() - t, time.process_time() - c, out


def cpu_per_row(root: Path, pg_url: str, server: pgserver.PgServer) -> None:
    n = 250_000
    rows = list(readings(n))
    data = batchfile.render_csv(rows)
    manifest = batchfile.build_manifest(
        batch_id="b-cpu",
        serial="GW-CPU",
        rows=n,
        sha256=batchfile.csv_sha256(data),
        first_ts=rows[0][1],
        last_ts=rows[-1][1],
        mode="LIVE",
        type="readings",
        created_at=store.now_ms(),
        first_id=1,
        last_id=n,
    )
    zpath = root / "cpu.zip"
    batchfile.write_zip(zpath, data, manifest)
    del rows, data

    def unzip_hash() -> None:
        with batchfile.open_batch(zpath) as b, b.zf.open(batchfile.CSV_NAME) as m:
            import hashlib

            h = hashlib.sha256()
            while chunk := m.read(1 << 16):
                h.update(chunk)

    # what the hub does with an upload (pyarrow, the names checked)
    def parse() -> None:
        with batchfile.open_batch(zpath) as b:
            b.table(manifest)

    stages = {
        "unzip + SHA-256": timed(unzip_hash)[1],
        "+ parse and check": timed(parse)[1],
    }
    walls = {}
    for label, db in (("sqlite", str(root / "cpu.db")), ("postgresql", pg_url)):
        st = open_storage(db)
        backend_pid = None
        if label == "postgresql":
            backend_pid = st.conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[attr-defined]
            server_before = proc_cpu(backend_pid)

        def full(st: Any = st) -> None:
            with batchfile.open_batch(zpath) as b:
                st.ingest("GW-CPU", "b-cpu", b.table(manifest), manifest=manifest)

        wall, cpu, _ = timed(full)
        stages[f"+ ingest, {label} (hub process)"] = cpu
        if backend_pid is not None:
            stages["  PostgreSQL's own backend process"] = (
                proc_cpu(backend_pid) - server_before
            )
        walls[label] = wall
        st.close()
    print(f"\nCPU per row, one {n}-row batch zip, in process:")
    for label, secs in stages.items():
        print(f"  {label:40s} {secs:6.2f} s  {secs / n * 1e6:6.2f} us/row")
    print("  wall: " + ", ".join(f"{k} {v:.2f} s" for k, v in walls.items()))


def load_week(st: Any, days: int) -> None:
    """GW-Q's device TH-1: ``days`` of 1 Hz temperature and humidity (also bench/hub/pages.py)."""
    n = days * 86_400
    for metric in ("temperature", "humidity"):
        for k in range(0, n, 100_000):
            st.ingest(
                "GW-Q",
                f"{metric}-{k}",
                (
                    ("TH-1", T0 + i * 1000, metric, 20 + (i % 600) / 60)
                    for i in range(k, min(n, k + 100_000))
                ),
            )


def query_bench(root: Path, pg_url: str, days: int) -> dict[str, tuple[float, float]]:
    n = days * 86_400
    out = {}
    for label, db in (("sqlite", str(root / "query.db")), ("postgresql", pg_url)):
        st = open_storage(db)
        t = time.perf_counter()
        load_week(st, days)
        load = time.perf_counter() - t
        st.add_user("bench", hash_password("bench-password", n=2**10), [], admin=True)
        st.close()
        hub = HubProc(root / f"qhub-{label}", db, None, [])
        hub.start()
        try:
            params = {
                "serial": "GW-Q",
                "device": "TH-1",
                "metric": "temperature",
                "from": T0,
                "to": T0 + days * DAY,
                "every": 60,
            }
            times = []
            for _ in range(6):
                t = time.perf_counter()
                r = requests.get(
                    f"{hub.url}/api/v1/readings",
                    params=params,
                    auth=("bench", "bench-password"),
                    timeout=600,
                )
                times.append(time.perf_counter() - t)
                got = r.json()["readings"]
                assert len(got) == days * 1440 and sum(b["count"] for b in got) == n, (
                    len(got)
                )
            t = time.perf_counter()
            raw = requests.get(
                f"{hub.url}/api/v1/readings",
                params={k: v for k, v in params.items() if k != "every"}
                | {"format": "csv"},
                auth=("bench", "bench-password"),
                timeout=600,
            )
            raw_secs = time.perf_counter() - t
            assert raw.text.count("\n") == n + 1
        finally:
            hub.stop()
        # the first request pays for the login check (scrypt) too: report it apart
        out[label] = (times[0], statistics.median(times[1:]))
        print(
            f"  {label:10s}: loaded {2 * n} readings in {load:.1f} s; every=60 over {days} days "
            f"({days * 1440} buckets of {n} readings): first {times[0]:.3f} s, median of 5 "
            f"{statistics.median(times[1:]):.3f} s; the same {n} raw readings as CSV {raw_secs:.2f} s"
        )
    return out


def print_load(before: float) -> None:
    print(
        f"\n{os.cpu_count()} cores, load average {before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateways", type=int, default=4)
    ap.add_argument("--rows", type=int, default=250_000, help="readings per gateway")
    ap.add_argument(
        "--batch-rows", type=int, default=50_000, help="upload.batch_max_rows"
    )
    ap.add_argument("--workers", type=int, default=2, help="hub worker processes")
    ap.add_argument(
        "--threads", type=int, default=4, help="threads per hub worker (this tree)"
    )
    ap.add_argument(
        "--ref", default="main", help="the git ref whose hub is the baseline"
    )
    ap.add_argument("--query-days", type=int, default=7)
    ap.add_argument(
        "--old-rows", type=int, default=1_000_000, help="deleted by retention"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--ingest-only",
        action="store_true",
        help="only the ingest (1.): no retention, query or CPU-per-row part",
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fieldgate-bench-hub-"))
    load_before = os.getloadavg()
    server = pgserver.start(durable=True)
    os.environ["PGPASSWORD"] = pgserver.PASSWORD
    try:
        total = args.gateways * args.rows
        t = time.perf_counter()
        fresh = [
            (
                make_gateway(
                    root / "gw" / f"a{g}", f"GW-A{g}", args.rows, args.batch_rows, T0
                ).parent,
                f"GW-A{g}",
            )
            for g in range(args.gateways)
        ]
        during = [
            (
                make_gateway(
                    root / "gw" / f"b{g}", f"GW-B{g}", args.rows, args.batch_rows, T0
                ).parent,
                f"GW-B{g}",
            )
            for g in range(0 if args.ingest_only else args.gateways)
        ]
        print(
            f"prepared {len(fresh) + len(during)} gateways of {args.rows} readings, batches of "
            f"{args.batch_rows}, in {time.perf_counter() - t:.1f} s"
        )
        base_src = extract_ref(args.ref, root / "ref")
        hubs: list[tuple[str, str, Path | None, list[str]]] = [
            (
                f"{args.ref} sqlite",
                str(root / "main.db"),
                base_src,
                ["--workers", str(args.workers)],
            ),
            (
                "sqlite",
                str(root / "hub.db"),
                None,
                ["--workers", str(args.workers), "--threads", str(args.threads)],
            ),
        ]
        pg_db = server.new_database()
        hubs.append(("postgresql", server.url(pg_db), None, hubs[1][3]))
        rates: dict[str, float] = {}
        hub_cpus: dict[str, float] = {}
        print(
            f"\ningest: {args.gateways} gateways x {args.rows} readings at once, {args.workers} hub workers"
        )
        for label, db, src, extra in hubs:
            hub = HubProc(root / f"hub-{label.replace(' ', '-')}", db, src, extra)
            hub.start()
            pg0 = pg_cpu(server) if label == "postgresql" else 0.0
            hub_cpu0 = children_cpu()
            try:
                secs, up_cpu, reg_cpu = ingest(
                    hub, fresh, root / f"run-{label.replace(' ', '-')}"
                )
            finally:
                hub.stop()
            # the hub's processes (its start included), not the registration commands
            hub_cpu = children_cpu() - hub_cpu0 - up_cpu - reg_cpu
            held = hub.count()
            if held != total:
                print(f"FAIL: {label} holds {held} readings, expected {total}")
                return 1
            rates[label] = total / secs
            extra_cpu = (
                f", PostgreSQL {pg_cpu(server) - pg0:.1f}"
                if label == "postgresql"
                else ""
            )
            print(
                f"  {label:12s}: {secs:6.2f} s  {rates[label]:9.0f} rows/s   CPU s: uploaders "
                f"{up_cpu:.1f}, hub {hub_cpu:.1f} ({hub_cpu / total * 1e6:.2f} per 1M readings)"
                f"{extra_cpu}"
            )
            hub_cpus[label] = hub_cpu
        ratio = rates["sqlite"] / rates[f"{args.ref} sqlite"]
        print(
            f"  sqlite now / {args.ref}: {ratio:.2f} (target >= 1.0); hub CPU "
            f"{hub_cpus['sqlite'] / hub_cpus[f'{args.ref} sqlite']:.2f}x {args.ref}'s"
        )
        print(f"  postgresql: {rates['postgresql']:.0f} rows/s (target >= 50,000)")
        if args.ingest_only:
            print_load(load_before[0])
            return 0

        print(
            f"\nretention during ingest: {args.old_rows} old readings deleted by 'hub prune' meanwhile"
        )
        for label, db, _, extra in hubs[1:]:
            st = open_storage(db)
            old = T0 - 400 * DAY
            for k in range(0, args.old_rows, 100_000):
                st.ingest(
                    "GW-OLD",
                    f"old-{k}",
                    (
                        ("D", old + i * 1000, "m", 1.0)
                        for i in range(k, min(args.old_rows, k + 100_000))
                    ),
                )
            st.close()
            hub = HubProc(root / f"rhub-{label}", db, None, extra)
            hub.start()
            try:
                # keep the bench's readings (from T0 on), delete the old ones (400 days before)
                days = str((store.now_ms() - T0) // DAY + 30)
                prune = subprocess.Popen(
                    [FIELDGATE, "hub", "prune", "--db", db, "--days", days],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                t = time.perf_counter()
                secs, _, _ = ingest(hub, during, root / f"rrun-{label}")
                out, err = prune.communicate()
                prune_secs = time.perf_counter() - t
            finally:
                hub.stop()
            held = hub.count()
            if prune.returncode != 0 or held != 2 * total:
                print(
                    f"FAIL: {label}: prune {prune.returncode} {err.strip()} {out.strip()}; {held} held"
                )
                return 1
            print(
                f"  {label:12s}: ingest {secs:6.2f} s {total / secs:9.0f} rows/s "
                f"({total / secs / rates[label]:.2f} of the rate without); prune: {out.strip()} "
                f"(done {prune_secs:.1f} s after the ingest started)"
            )

        print(f"\nbucketed query ({args.query_days} days of 1 Hz, 1-minute buckets):")
        q = query_bench(root, server.url(server.new_database()), args.query_days)
        for label, (_, median) in q.items():
            print(f"  {label}: median {median:.3f} s (target <= 1 s)")

        cpu_per_row(root, server.url(server.new_database()), server)
        print_load(load_before[0])
    finally:
        os.environ.pop("PGPASSWORD", None)
        server.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
