"""Benchmark: the broker's arrival-stamp plugin, MQTT v5 drains, and the broker's window of loss.

Part ``stamp`` (issue 16): a real Mosquitto with and without the plugin that ``fieldgate
broker-conf`` names (persistence on, no autosave during the run, the mosquitto role's queue and
inflight settings). Two persistent sessions are registered and left offline, one MQTT 3.1.1
(clean_session off) and one MQTT v5 (clean_start off, a session that never expires); a paho
3.1.1 publisher sends N QoS 1 messages (default 100,000) over 100 device topics, waiting for
every PUBACK; then each session drains its backlog with a bare paho subscriber (manual
acknowledgement of each message in order, the stamp read with ``fieldgate.stamp.arrival_ms``).
Prints, as medians over ``--rounds``: the publish rate and the broker's CPU per message with
the plugin against without it, and each drain (v3.1.1/v5, with/without the plugin) against the
v3.1.1 drain without the plugin.

Part ``instr``: the broker's instructions per message under callgrind (repeatable whatever
else the machine does), with and without the plugin: ``--instr-messages`` (default 20,000)
QoS 1 messages queued for an offline v5 session and drained, minus a run without messages.

Part ``loss`` (issue 15, item 3): how many acknowledged QoS 1 messages a SIGKILLed broker loses
while the collector is away, and what each autosave setting costs:

- loss: a paced publisher (``--rate`` msgs/s for ``--secs`` s, plus 0-99 more messages so the
  kill falls anywhere in a save cycle) into an offline session, the broker SIGKILLed right
  after the last PUBACK, restarted, the session drained: lost = acknowledged - delivered
  (``--trials`` times per setting);
- cost: the flood publish rate of ``--flood`` messages on top of an existing backlog of 0 and
  ``--backlog`` messages (the collector away for a while), against persistence without autosave.

- idle: with that backlog and nothing arriving, what the broker writes in ``--idle`` seconds
  (``/proc/PID/io`` write_bytes: the write amplification of saves nobody needed).

Settings: ``periodic`` = ``autosave_on_changes false`` + ``autosave_interval 1``;
``changes-N`` = ``autosave_on_changes true`` + ``autosave_interval N`` (the role's earlier
default N was 100); ``plugin`` = ``autosave_interval 0`` + the fieldgate plugin, which asks for
a save (SIGUSR1) within 500 ms of a message (what the mosquitto role deploys since issue 15).
Only ``plugin`` loads the plugin. No timing is asserted; the script prints figures and ratios.

Run from the repository root:

    .venv/bin/python bench/broker/run.py [--part stamp|instr|loss|all] [--messages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from fieldgate.stamp import arrival_ms, session_properties

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
DEVICES = 100
PAYLOAD = (
    b'{"temperature":21.5,"humidity":45.5,"linkquality":120}'  # a Zigbee2MQTT-like body
)
CLK_TCK = os.sysconf("SC_CLK_TCK")

PERSISTENCE = {
    "none": "persistence false\n",
    "quiet": "persistence true\nautosave_interval 86400\n",
    "periodic": "persistence true\nautosave_on_changes false\nautosave_interval 1\n",
    "plugin": "persistence true\nautosave_interval 0\n",
}


def persistence_conf(setting: str) -> str:
    if setting.startswith("changes-"):
        n = int(setting.split("-", 1)[1])
        return f"persistence true\nautosave_on_changes true\nautosave_interval {n}\n"
    return PERSISTENCE[setting]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plugin_lines() -> str:
    p = subprocess.run(
        [FIELDGATE, "broker-conf"], capture_output=True, text=True, check=False
    )
    if p.returncode != 0:
        raise SystemExit(f"bench: fieldgate broker-conf failed: {p.stderr.strip()}")
    return p.stdout


@dataclass
class Broker:
    """A real Mosquitto on loopback; ``workdir`` keeps its persistence file across restarts."""

    workdir: Path
    persistence: str
    plugin: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    wrapper: list[str] = field(default_factory=list)  # e.g. valgrind and its options

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"persistence_location {self.workdir}/\n"
            + persistence_conf(self.persistence)
            + "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 2000\n"
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"log_dest file {self.workdir}/mosquitto.log\n"
            + self.plugin
        )
        self.proc = subprocess.Popen(
            [*self.wrapper, "mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise SystemExit(
            f"bench: mosquitto did not start; see {self.workdir}/mosquitto.log"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(120)
            self.proc = None

    def written(self) -> int:
        """Bytes the broker caused to be written to storage so far."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def cpu_secs(self) -> float:
        assert self.proc is not None
        fields = (
            Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        )
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def client(client_id: str, protocol: int) -> mqtt.Client:
    if protocol == mqtt.MQTTv5:
        return mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        clean_session=False,
        manual_ack=True,
    )


def connect(c: mqtt.Client, port: int, protocol: int) -> None:
    if protocol == mqtt.MQTTv5:
        c.connect("127.0.0.1", port, clean_start=False, properties=session_properties())
    else:
        c.connect("127.0.0.1", port)


def register(port: int, client_id: str, protocol: int) -> None:
    """A persistent session subscribed at QoS 1 to every device topic, left offline."""
    c = client(client_id, protocol)
    done = {"suback": False}
    c.on_subscribe = lambda *_a: done.update(suback=True)
    connect(c, port, protocol)
    c.subscribe("fg/+/state", qos=1)
    while not done["suback"]:
        c.loop(0.1)
    c.disconnect()


def publish(port: int, n: int, rate: float = 0.0) -> tuple[float, int]:
    """n QoS 1 messages round-robin over the device topics (paced at ``rate`` msgs/s if set),
    each waited for; returns (seconds, messages acknowledged)."""
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv311
    )
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    acked = {"n": 0}
    c.on_publish = lambda *_a: acked.update(n=acked["n"] + 1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    started = time.monotonic()
    try:
        for first in range(0, n, 10_000):  # message ids wrap at 65535
            infos = []
            for i in range(first, min(n, first + 10_000)):
                if rate:
                    delay = started + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                infos.append(
                    c.publish(f"fg/dev-{i % DEVICES:03d}/state", PAYLOAD, qos=1)
                )
            for info in infos:
                info.wait_for_publish(timeout=600)
        return time.monotonic() - started, acked["n"]
    finally:
        c.disconnect()
        c.loop_stop()


@dataclass
class Drain:
    received: int
    stamped: int
    secs: float  # from CONNECT to the last message
    cpu: float  # CPU seconds of this (subscriber) process meanwhile


def drain(port: int, client_id: str, protocol: int, n: int, idle: float = 0.0) -> Drain:
    """Receive until n messages (or, with ``idle``, until nothing came for that long),
    acknowledging each in order, reading its stamp."""
    c = client(client_id, protocol)
    got = {"n": 0, "stamped": 0, "last": time.monotonic()}

    def on_message(cl: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got["n"] += 1
        got["last"] = time.monotonic()
        if arrival_ms(msg.properties) is not None:
            got["stamped"] += 1
        cl.ack(msg.mid, msg.qos)

    c.on_message = on_message
    cpu0 = time.process_time()
    started = time.monotonic()
    connect(c, port, protocol)
    while got["n"] < n:
        c.loop(0.05)
        if idle and time.monotonic() - max(got["last"], started) > idle:
            break
    cpu = time.process_time() - cpu0
    c.disconnect()
    return Drain(int(got["n"]), int(got["stamped"]), got["last"] - started, cpu)


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Figures:
    """Per configuration: rates (msgs/s) and CPU microseconds per message, one per round."""

    rate: list[float] = field(default_factory=list)
    client_us: list[float] = field(default_factory=list)
    broker_us: list[float] = field(default_factory=list)

    def add(self, n: int, secs: float, client_cpu: float, broker_cpu: float) -> None:
        self.rate.append(n / secs)
        self.client_us.append(client_cpu / n * 1e6)
        self.broker_us.append(broker_cpu / n * 1e6)

    def ratios(self, base: Figures) -> str:
        r = median(self.rate)
        cu, bu = median(self.client_us), median(self.broker_us)
        return (
            f"{r / median(base.rate):.2f}x rate ({r:7.0f} msgs/s), "
            f"{cu / median(base.client_us):.2f}x client CPU ({cu:5.1f} us/msg), "
            f"{bu / median(base.broker_us):.2f}x broker CPU ({bu:4.1f} us/msg)"
        )


def part_stamp(work: Path, n: int, rounds: int) -> None:
    lines = plugin_lines()
    print(f"== stamp: {n} QoS 1 messages over {DEVICES} topics, {rounds} round(s)")
    pub = {"off": Figures(), "on": Figures()}
    drains = {(v, p): Figures() for v in ("v3", "v5") for p in ("off", "on")}
    for r in range(rounds):
        for plugin in ("off", "on") if r % 2 == 0 else ("on", "off"):
            b = Broker(
                work / f"stamp-{r}-{plugin}", "quiet", lines if plugin == "on" else ""
            )
            b.start()
            try:
                register(b.port, "drain-v3", mqtt.MQTTv311)
                register(b.port, "drain-v5", mqtt.MQTTv5)
                b0, c0 = b.cpu_secs(), time.process_time()
                secs, acked = publish(b.port, n)
                pub[plugin].add(
                    acked, secs, time.process_time() - c0, b.cpu_secs() - b0
                )
                for name in ("v3", "v5") if r % 2 == 0 else ("v5", "v3"):
                    proto = mqtt.MQTTv5 if name == "v5" else mqtt.MQTTv311
                    b0 = b.cpu_secs()
                    d = drain(b.port, f"drain-{name}", proto, n)
                    want = n if (plugin, name) == ("on", "v5") else 0
                    if d.received != n or d.stamped != want:
                        raise SystemExit(
                            f"bench: {name}/{plugin}: {d.received} received, {d.stamped} stamped"
                        )
                    drains[(name, plugin)].add(n, d.secs, d.cpu, b.cpu_secs() - b0)
            finally:
                b.stop()
            print(
                f"round {r + 1} plugin {plugin:3}: publish {pub[plugin].rate[-1]:6.0f} msgs/s, "
                f"drain v3.1.1 {drains[('v3', plugin)].rate[-1]:6.0f}, "
                f"v5 {drains[('v5', plugin)].rate[-1]:6.0f} msgs/s"
            )
    print(
        "medians; rates are wall clock (noisy on a shared machine), CPU per message is steadier"
    )
    print(f"publish, plugin vs none:           {pub['on'].ratios(pub['off'])}")
    base = drains[("v3", "off")]
    for key, label in (
        (("v5", "off"), "drain v5 vs v3.1.1, no plugin:"),
        (("v3", "on"), "drain v3.1.1, plugin vs none:"),
        (("v5", "on"), "drain v5 + plugin vs v3.1.1 none:"),
    ):
        print(f"{label:34} {drains[key].ratios(base)}")
    print(
        f"drain v5, plugin vs none:          {drains[('v5', 'on')].ratios(drains[('v5', 'off')])}"
    )


def part_loss(
    work: Path,
    rate: float,
    secs: float,
    trials: int,
    flood: int,
    backlog: int,
    idle: float,
) -> None:
    lines = plugin_lines()
    settings = ["plugin", "periodic", "changes-1", "changes-10", "changes-100"]

    def broker(d: Path, setting: str, **kw: int) -> Broker:
        return Broker(d, setting, lines if setting == "plugin" else "", **kw)

    base_n = int(rate * secs)
    rnd = random.Random(
        16
    )  # the kill falls anywhere in a save cycle, the same each run
    print(
        f"== loss: {base_n} to {base_n + 99} QoS 1 messages at {rate:g} msgs/s, "
        "SIGKILL right after the last PUBACK"
    )
    for setting in settings:
        lost = []
        for t in range(trials):
            n = base_n + rnd.randrange(100)
            b = broker(work / f"loss-{setting}-{t}", setting)
            b.start()
            register(b.port, "collector", mqtt.MQTTv311)
            _s, acked = publish(b.port, n, rate)
            b.stop(signal.SIGKILL)
            b.start()
            d = drain(b.port, "collector", mqtt.MQTTv311, acked, idle=3.0)
            b.stop()
            lost.append(acked - d.received)
        print(
            f"{setting:12} lost {sorted(lost)} acknowledged (median {median(lost):g})"
        )

    print(
        f"== cost: flood publish of {flood} messages onto an offline session's backlog"
    )
    base: dict[int, float] = {}
    db_mb = 0.0
    for setting in ["quiet", "none", *settings]:
        row = []
        # without persistence there is no backlog to load: only the empty case
        for pre in (0,) if setting == "none" else (0, backlog):
            d = work / f"cost-{setting}-{pre}"
            if pre:
                # fill the backlog without autosave, save it on a clean stop, then measure
                filler = Broker(d, "quiet")
                filler.start()
                register(filler.port, "collector", mqtt.MQTTv311)
                publish(filler.port, pre)
                filler.stop()
                db_mb = (d / "mosquitto.db").stat().st_size / 1e6
                b = broker(d, setting, port=filler.port)
            else:
                b = broker(d, setting)
            b.start()
            if not pre:
                register(b.port, "collector", mqtt.MQTTv311)
            w0, c0 = b.written(), b.cpu_secs()
            secs, acked = publish(b.port, flood)
            wrote, cpu = (b.written() - w0) / 1e6, b.cpu_secs() - c0
            extra = ""
            if pre:
                time.sleep(1.5)  # the last save requested by the flood
                w0 = b.written()
                time.sleep(idle)
                extra = f", idle {idle:g} s: {(b.written() - w0) / 1e6:6.1f} MB written"
            b.stop()
            r = acked / secs
            base.setdefault(pre, r)
            row.append(
                f"backlog {pre:>6}: {r:8.0f} msgs/s = {r / base[pre]:.3f}x, "
                f"{wrote:7.1f} MB written, broker CPU {cpu:5.2f} s{extra}"
            )
        print(f"{setting:12} " + "\n             ".join(row))
    print(
        f"(a backlog of {backlog} messages is a {db_mb:.1f} MB mosquitto.db, rewritten by each save)"
    )


def callgrind_total(out: Path) -> int:
    """The instruction count (Ir) a callgrind output file sums up."""
    for line in out.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"bench: no totals in {out}")


def part_instructions(work: Path, n: int) -> None:
    """Broker instructions per message (callgrind: repeatable on a loaded machine)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit(
            "bench: --part instr needs valgrind (apt-get install valgrind)"
        )
    lines = plugin_lines()
    print(
        f"== instructions: broker under callgrind, {n} QoS 1 messages queued and drained (v5)"
    )
    per: dict[str, float] = {}
    for plugin in ("off", "on"):
        totals = []
        for m in (0, n):  # the difference leaves out start-up and sessions
            d = work / f"instr-{plugin}-{m}"
            out = d / "callgrind.out"
            b = Broker(
                d,
                "quiet",
                lines if plugin == "on" else "",
                wrapper=[valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"],
            )
            b.start()
            register(b.port, "drain-v5", mqtt.MQTTv5)
            if m:
                publish(b.port, m)
                d5 = drain(b.port, "drain-v5", mqtt.MQTTv5, m)
                if d5.stamped != (m if plugin == "on" else 0):
                    raise SystemExit(f"bench: {d5.stamped} of {m} stamped")
            b.stop()
            totals.append(callgrind_total(out))
        per[plugin] = (totals[1] - totals[0]) / n
        print(f"plugin {plugin:3}: {per[plugin]:8.0f} broker instructions per message")
    extra = per["on"] - per["off"]
    print(
        f"broker instructions, plugin / none = {per['on'] / per['off']:.3f}x (+{extra:.0f})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["stamp", "instr", "loss", "all"], default="all")
    ap.add_argument("--messages", type=int, default=100_000, help="stamp: backlog size")
    ap.add_argument("--rounds", type=int, default=2, help="stamp: rounds (medians)")
    ap.add_argument("--rate", type=float, default=500, help="loss: paced publish rate")
    ap.add_argument("--secs", type=float, default=4, help="loss: seconds of publishing")
    ap.add_argument("--trials", type=int, default=3, help="loss: kills per setting")
    ap.add_argument("--flood", type=int, default=2000, help="cost: messages published")
    ap.add_argument(
        "--backlog", type=int, default=50_000, help="cost: existing backlog"
    )
    ap.add_argument(
        "--instr-messages", type=int, default=20_000, help="instr: messages"
    )
    ap.add_argument("--idle", type=float, default=5, help="cost: idle seconds measured")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-broker-"))
    try:
        if args.part in ("stamp", "all"):
            part_stamp(work, args.messages, args.rounds)
        if args.part in ("instr", "all"):
            part_instructions(work, args.instr_messages)
        if args.part in ("loss", "all"):
            part_loss(
                work,
                args.rate,
                args.secs,
                args.trials,
                args.flood,
                args.backlog,
                args.idle,
            )
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
