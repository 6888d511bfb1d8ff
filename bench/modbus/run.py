"""Benchmark: one Modbus poll round of 50 devices x 60 registers, coalesced against one request
per register, and the poller's CPU at a 10 s interval.

Starts 50 pymodbus TCP servers on loopback in a second process (one asyncio loop; each device
a meter-like map of 60 values: 20 float32 input registers, 20 int16 and 10 uint32 holding
registers with a reserved hole of 10 registers, 10 coils). Then, in one run:

- rounds of the fieldgate Modbus poller (``ModbusPoller.once``, what ``fieldgate poll
  --once`` does: 50 buses side by side, all driven by one selector thread, the plan,
  decoding, the store), coalesced and with every value read by its own request (the same
  poller, client, decoding and store; only the plan differs), alternating, ``--rounds`` of each; the wall time of a round and of its
  reads alone (first poll's start to last poll's end);
- the same two plans in the running poller (``ModbusPoller.run``, the loop of ``fieldgate
  poll``): both run at once on the same devices and store, every device due every 4 s, their
  ticks 2 s apart, so their rounds alternate; tick to the commit of the round's last poll;
- ``fieldgate poll`` (the CLI, a process of its own) at ``interval_secs: 10`` for
  ``--cpu-secs`` (default 60) after its first round: its CPU time (user + system, from
  /proc) as a share of one core.

A round, the same for both plans: from the tick at which every device is due to the commit
that stored the last of their readings (all 3,000 readings inserted, the devices' facts and
the summary updated, one durable commit); both plans run the same poller, client, decoding
and store, only the plan of requests differs. Prints the medians of ``--rounds`` rounds
(default 15) and their ratio (target: the running poller's coalesced round >= 10x faster
than its round with one request per value; the ``--once`` ratios are printed too), the CPU
seconds a ``--once`` round costs (the poller with its store, and the simulated devices:
steadier than wall time on a loaded machine; printed, not a target), the CPU share
(target <= 5 %), checks every round stored 3,000 readings, and exits 1 when a target is
missed. ``--latency-ms`` delays every answer of the simulated devices, as a real device's
turnaround would (default 0: loopback and the simulator's own cost only). No timing here is
asserted by the test suite.

Run from the repository root:

    .venv/bin/python bench/modbus/run.py [--devices 50] [--rounds 15] [--cpu-secs 60]
                                         [--latency-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def register_map() -> tuple[list[dict[str, Any]], dict[str, dict[int, Any]]]:
    """The 60-value map of every simulated device and the memory that serves it."""
    regs: list[dict[str, Any]] = []
    memory: dict[str, dict[int, Any]] = {"input": {}, "holding": {}, "coil": {}}
    for i in range(20):  # 20 float32 at input 0-39: voltages, currents, powers ...
        a = 2 * i
        regs.append(
            {"metric": f"f{i}", "address": a, "table": "input", "type": "float32"}
        )
        raw = struct.pack(">f", 100.0 + i / 4)
        memory["input"][a] = int.from_bytes(raw[:2], "big")
        memory["input"][a + 1] = int.from_bytes(raw[2:], "big")
    for i in range(20):  # 20 int16 at holding 0-19
        regs.append(
            {"metric": f"s{i}", "address": i, "table": "holding", "type": "int16"}
        )
        memory["holding"][i] = i
    for i in range(10):  # a reserved hole at 20-29, then 10 uint32 at holding 30-49
        a = 30 + 2 * i
        regs.append(
            {"metric": f"u{i}", "address": a, "table": "holding", "type": "uint32"}
        )
        memory["holding"][a], memory["holding"][a + 1] = 0, 1000 + i
    for i in range(10):  # 10 coils
        regs.append({"metric": f"c{i}", "address": i, "table": "coil"})
        memory["coil"][i] = i % 2 == 0
    return regs, memory


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def serve(ports: list[int], latency_ms: float) -> None:
    """The simulated devices (``--serve``): one pymodbus TCP server per port, one loop; each
    answer delayed by ``latency_ms`` (a real device's turnaround) without blocking the loop."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    _, memory = register_map()

    def flat(table: str) -> list[Any]:
        values = memory[table]
        return [values.get(a, 0) for a in range(max(values) + 1)]

    coils = [bool(v) for v in flat("coil")]

    async def turnaround(*_args: Any) -> None:
        await asyncio.sleep(latency_ms / 1000)

    async def main() -> None:
        for port in ports:
            device = SimDevice(
                id=1,
                simdata=(
                    [SimData(0, values=coils, datatype=DataType.BITS)],
                    [SimData(0, values=[False], datatype=DataType.BITS)],
                    [SimData(0, values=flat("holding"), datatype=DataType.REGISTERS)],
                    [SimData(0, values=flat("input"), datatype=DataType.REGISTERS)],
                ),
                action=turnaround if latency_ms else None,
            )
            server = ModbusTcpServer(device, address=("127.0.0.1", port))
            await server.serve_forever(background=True)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_servers(ports: list[int], latency_ms: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--latency-ms",
            str(latency_ms),
            "--serve",
            *map(str, ports),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit("bench: the simulated devices did not start")
    return proc


def write_config(work: Path, ports: list[int], interval: float) -> Path:
    regs, _ = register_map()
    names = [f"MTR-{i:03d}" for i in range(len(ports))]
    cfg = {
        "site": {"serial": "GW-BENCH"},
        "store": {"path": str(work / "data_store.db")},
        "devices": {"list": [{"serial": n} for n in names]},
        "poll": {
            "interval_secs": interval,
            "timeout_secs": 5,
            "modbus": [
                {"device": n, "host": "127.0.0.1", "port": p, "registers": regs}
                for n, p in zip(names, ports, strict=True)
            ],
        },
        "log": {"level": "WARNING"},
    }
    path = work / "fieldgate.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def one_round(poller: Any, servers: int) -> tuple[float, float, int, int, float]:
    """One round: wall seconds (reads and store), seconds until every device was read (from
    the first poll's start to the last poll's end, ms resolution), requests, readings, and
    the CPU seconds it cost: this process (the poller and its store) and the simulated
    devices' process (pid ``servers``, in clock ticks)."""
    before = sum(s.requests for s in poller.stats.values())
    cpu, ticks = time.process_time(), cpu_ticks(servers)
    started = time.perf_counter()
    results = poller.once()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu + (cpu_ticks(servers) - ticks) / CLK_TCK
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"bench: {len(failed)} devices failed: {failed[0].detail}")
    stats = poller.stats.values()
    read = (max(s.last_success for s in stats) - min(s.last_poll for s in stats)) / 1000
    requests = sum(s.requests for s in stats) - before
    time.sleep(0.01)  # the next round gets its own poll time
    return wall, read, requests, sum(r.new_readings for r in results), cpu


def daemon_rounds(config: Path, n: int) -> dict[bool, list[float]]:
    """Seconds of ``n`` steady-state rounds of the running poller (``ModbusPoller.run``, the
    loop of ``fieldgate poll``), coalesced and one request per value, interleaved: both
    pollers run at once on the same devices and store, every device due every 4 s, the second
    poller's ticks 2 s after the first's, so their rounds alternate and never overlap. A round
    is from its tick (the scheduled time) to the commit that stored its last poll. The first
    round of each (connections being opened) is not counted."""
    import threading

    from fieldgate.config import load_config
    from fieldgate.modbus.poller import ModbusPoller

    data = yaml.safe_load(config.read_text())
    for dev in data["poll"]["modbus"]:
        dev["interval_secs"] = 4
    daemon_config = config.with_name("daemon.yaml")
    daemon_config.write_text(yaml.safe_dump(data))
    devices = len(data["poll"]["modbus"])
    stop = threading.Event()
    runs = []
    for coalesce in (True, False):
        poller = ModbusPoller(load_config(str(daemon_config)), coalesce=coalesce)
        commits: list[
            tuple[float, int]
        ] = []  # (monotonic time after a commit, polls stored)
        store_round = poller.store_round

        def timed(
            *args: Any, _store: Any = store_round, _commits: Any = commits
        ) -> Any:
            results = _store(*args)
            _commits.append((time.monotonic(), len(results)))
            return results

        poller.store_round = timed  # type: ignore[method-assign]
        thread = threading.Thread(target=poller.run, args=(stop,))
        thread.start()
        runs.append((coalesce, poller, commits, thread))
        if coalesce:
            time.sleep(2)
    try:
        deadline = time.monotonic() + 4 * (n + 1) + 30
        while any(
            sum(c for _, c in commits) < devices * (n + 1) for _, _, commits, _ in runs
        ):
            if time.monotonic() > deadline or not all(r[3].is_alive() for r in runs):
                raise SystemExit(
                    "bench: the running pollers did not finish their rounds"
                )
            time.sleep(0.05)
    finally:
        stop.set()
        for *_, thread in runs:
            thread.join(30)
    out = {}
    for coalesce, poller, commits, _ in runs:
        origin = poller.origin
        ends, stored = [], 0
        for at, count_ in commits:
            stored += count_
            if stored >= devices * (len(ends) + 1):
                ends.append(at)
        out[coalesce] = [ends[k] - (origin + 4 * k) for k in range(1, n + 1)]
    return out


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def count(db: Path) -> int:
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def measure_cpu(work: Path, ports: list[int], secs: float) -> tuple[float, int, int]:
    """``fieldgate poll`` at a 10 s interval: CPU % of one core over ``secs`` after its first
    round, readings stored meanwhile, and its log's size (a quiet log is part of the cost)."""
    cpu_dir = work / "cpu"
    cpu_dir.mkdir()
    config = write_config(cpu_dir, ports, interval=10)
    db = cpu_dir / "data_store.db"
    log = cpu_dir / "poll.log"
    env = {**os.environ, "FIELDGATE_CONFIG": str(config)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [FIELDGATE, "poll"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        per_round = 60 * len(ports)
        deadline = time.monotonic() + 60
        while count(db) < per_round:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"bench: fieldgate poll did not finish a round; see {log}"
                )
            time.sleep(0.1)
        t0, c0, r0 = time.monotonic(), cpu_ticks(proc.pid), count(db)
        time.sleep(secs)
        t1, c1, r1 = time.monotonic(), cpu_ticks(proc.pid), count(db)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    share = 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0)
    return share, r1 - r0, log.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cpu-secs", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay every answer of the simulated devices (a real device's turnaround; "
        "default 0: loopback only)",
    )
    ap.add_argument("--serve", nargs="+", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.latency_ms)
        return 0

    from fieldgate.config import load_config
    from fieldgate.modbus.poller import ModbusPoller

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-modbus-"))
    ports = free_ports(args.devices)
    servers = start_servers(ports, args.latency_ms)
    try:
        config = write_config(work, ports, interval=10)
        coalesced = ModbusPoller(load_config(str(config)))
        single = ModbusPoller(load_config(str(config)), coalesce=False)
        one_round(coalesced, servers.pid)  # warm-up: first connections
        one_round(single, servers.pid)
        c_rounds, s_rounds = [], []
        for _ in range(args.rounds):  # alternating, so both see the same machine load
            c_rounds.append(one_round(coalesced, servers.pid))
            s_rounds.append(one_round(single, servers.pid))
        n = args.devices
        latency = f", answers delayed {args.latency_ms:g} ms" if args.latency_ms else ""
        print(
            f"{n} devices x 60 registers on loopback{latency}; "
            f"median of {args.rounds} rounds each"
        )
        print(
            "                       round (read + store)   reads only   requests  readings"
        )
        for label, runs in (
            ("coalesced", c_rounds),
            ("one request per value", s_rounds),
        ):
            wall = statistics.median(r[0] for r in runs)
            read = statistics.median(r[1] for r in runs)
            print(
                f"{label:<22} {wall * 1000:12.1f} ms {read * 1000:14.1f} ms "
                f"{runs[-1][2]:10d} {runs[-1][3]:9d}"
            )
        for label, runs in (("coalesced", c_rounds), ("single", s_rounds)):
            print(
                f"  rounds (ms), {label}: "
                + " ".join(f"{r[0] * 1000:.0f}" for r in runs)
            )
        # CPU seconds do not wait for a core: the steadier figure on a loaded machine
        c_cpu = sum(r[4] for r in c_rounds) / len(c_rounds)
        s_cpu = sum(r[4] for r in s_rounds) / len(s_rounds)
        print(
            f"CPU per --once round (poller and store + simulated devices, mean of "
            f"{args.rounds}): coalesced {c_cpu * 1000:.1f} ms, one request per value "
            f"{s_cpu * 1000:.1f} ms ({s_cpu / c_cpu:.1f}x)"
        )
        daemon = daemon_rounds(config, n=args.rounds)
        c_daemon, s_daemon = daemon[True], daemon[False]
        print(
            "a round: from the tick at which every device is due to the commit that stored "
            "the last of their readings (the same for both plans)"
        )
        print(
            f"fieldgate poll's own rounds (running, interleaved, median of {args.rounds}): "
            "coalesced "
            f"{statistics.median(c_daemon) * 1000:.1f} ms, one request per value "
            f"{statistics.median(s_daemon) * 1000:.1f} ms"
        )
        for label, walls in (("coalesced", c_daemon), ("single", s_daemon)):
            print(
                f"  rounds (ms), {label}: " + " ".join(f"{w * 1000:.0f}" for w in walls)
            )
        c_wall = statistics.median(r[0] for r in c_rounds)
        s_wall = statistics.median(r[0] for r in s_rounds)
        c_req, s_req = c_rounds[-1][2], s_rounds[-1][2]
        c_read = min(r[3] for r in c_rounds)
        s_read = min(r[3] for r in s_rounds)
        read_ratio = statistics.median(r[1] for r in s_rounds) / statistics.median(
            r[1] for r in c_rounds
        )
        once_ratio = s_wall / c_wall
        ratio = statistics.median(s_daemon) / statistics.median(c_daemon)
        share, cpu_readings, log_bytes = measure_cpu(work, ports, args.cpu_secs)
        expected = 60 * n
        round_text = (
            f"round of the running poller: coalesced {ratio:.1f}x faster than one request "
            "per value (target >= 10x)"
        )
        print(
            f"info  --once round: coalesced {once_ratio:.1f}x faster (its reads alone "
            f"{read_ratio:.1f}x; each --once round also starts the poller's bus thread)"
        )
        cpu_text = (
            f"fieldgate poll at a 10 s interval: {share:.2f} % of one core over "
            f"{args.cpu_secs:g} s (target <= 5 %); {cpu_readings} readings stored "
            f"meanwhile, log {log_bytes} bytes"
        )
        results = [
            (round_text, ratio >= 10),
            (
                f"requests: {c_req} against {s_req} ({s_req / max(1, c_req):.0f}x fewer)",
                c_req < s_req,
            ),
            (cpu_text, share <= 5),
            (
                f"every round stored {expected} readings",
                c_read == expected and s_read == expected,
            ),
        ]
        for text, ok in results:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
        return 0 if all(ok for _, ok in results) else 1
    finally:
        servers.send_signal(signal.SIGTERM)
        servers.wait(30)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
