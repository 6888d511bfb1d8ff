"""The broker's arrival stamp (CONTRACT §9, issue 16): ``fieldgate broker-conf``, the Mosquitto
plugin it builds and names, proven through a real Mosquitto on loopback, and the collector's
reading of the stamp (:mod:`fieldgate.stamp`) over a real MQTT v5 persistent session."""

from __future__ import annotations

import platform
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from support import (
    COLLECTOR_PASSWORD,
    COLLECTOR_USER,
    MOSQUITTO,
    SENSOR_PASSWORD,
    SENSOR_USER,
    Broker,
    publish,
    run_fieldgate,
    v311_session,
    wait_until,
)

from fieldgate import broker as fgbroker
from fieldgate.stamp import STAMP_PROPERTY, arrival_ms, session_properties

FROZEN = "2026-01-01 00:00:00"  # libfaketime: an absolute time without '@' stops the clock
FROZEN_MS = 1_767_225_600_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def faketime_lib() -> Path:
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing (scripts/bootstrap.sh installs it)"
    return found[0]


def frozen_clock(spec_file: Path, spec: str = FROZEN) -> dict[str, str]:
    """Environment that stops mosquitto's wall clock at ``spec`` (read from ``spec_file``, so a
    test can step it). The monotonic clock keeps running: keepalives work as usual."""
    spec_file.write_text(spec + "\n")
    return {
        "LD_PRELOAD": str(faketime_lib()),
        "FAKETIME_TIMESTAMP_FILE": str(spec_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "TZ": "UTC",
    }


@contextmanager
def running(broker: Broker) -> Iterator[Broker]:
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def frozen_broker(tmp_path: Path, extra_conf: str = "") -> Broker:
    """A test broker whose wall clock stands at FROZEN (stepped through tmp_path/clock)."""
    return Broker(tmp_path / "broker", env=frozen_clock(tmp_path / "clock"), extra_conf=extra_conf)


@dataclass
class Received:
    topic: str
    payload: bytes
    mid: int
    dup: bool
    stamp: int | None
    properties: Properties | None


class Session:
    """A collector-like MQTT v5 client: persistent session (clean_start off, a session that
    never expires), QoS 1, manual acknowledgements in the order received (or none)."""

    def __init__(self, broker: Broker, client_id: str, *, topic: str = "fg/#", ack: bool = True):
        self.broker = broker
        self.topic = topic
        self.ack = ack
        self.messages: list[Received] = []
        self.session_present: bool | None = None
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        self.client.username_pw_set(COLLECTOR_USER, COLLECTOR_PASSWORD)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client, _userdata, flags, reason, _props) -> None:  # type: ignore[no-untyped-def]
        assert not reason.is_failure, reason
        self.session_present = flags.session_present
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client, _userdata, msg: mqtt.MQTTMessage) -> None:  # type: ignore[no-untyped-def]
        self.messages.append(
            Received(
                msg.topic,
                msg.payload,
                msg.mid,
                bool(msg.dup),
                arrival_ms(msg.properties),
                msg.properties,
            )
        )
        if self.ack:
            client.ack(msg.mid, msg.qos)

    def connect(self) -> Session:
        self.client.connect(
            self.broker.host,
            self.broker.port,
            clean_start=False,
            properties=session_properties(),
        )
        self.client.loop_start()
        assert self.subscribed.wait(10), "no SUBACK"
        return self

    def wait_for(self, n: int, timeout: float = 30) -> list[Received]:
        wait_until(lambda: len(self.messages) >= n, timeout, what=f"{n} messages")
        return self.messages

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT and without acknowledging anything more (a crash)."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.close()


def publish_v5(broker: Broker, messages: list[tuple[str, bytes, Properties | None]]) -> None:
    """Publish at QoS 1 with MQTT v5 (and properties); wait for every PUBACK."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(SENSOR_USER, SENSOR_PASSWORD)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1, properties=props) for t, p, props in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def receive(broker: Broker, client_id: str, messages: list[tuple[str, str]]) -> list[Received]:
    """Publish (QoS 1, MQTT 3.1.1) to a v5 session and return what it received."""
    sub = Session(broker, client_id).connect()
    publish(broker, messages)
    got = sub.wait_for(len(messages))
    sub.disconnect()
    return got


def stamps(received: list[Received], topic: str) -> list[int]:
    out = [m.stamp for m in received if m.topic == topic]
    assert all(s is not None for s in out), "an unstamped message"
    return out  # type: ignore[return-value]


def strictly_increasing(values: list[int]) -> bool:
    return all(a < b for a, b in pairwise(values))


# --- the collector's reading of the stamp (pure functions) ---------------------------------


def props(*pairs: tuple[str, str]) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    for pair in pairs:
        p.UserProperty = pair
    return p


def test_arrival_ms_reads_the_brokers_stamp() -> None:
    assert arrival_ms(None) is None  # MQTT 3.1.1
    assert arrival_ms(Properties(PacketTypes.PUBLISH)) is None
    assert arrival_ms(props(("a", "b"))) is None
    assert arrival_ms(props((STAMP_PROPERTY, "1767225600123"))) == 1_767_225_600_123
    # the broker appends its own after anything else: the last one counts
    assert (
        arrival_ms(props(("fg-ts", "1767225600000"), ("x", "y"), ("fg-ts", "1767225600999")))
        == 1_767_225_600_999
    )
    assert (
        arrival_ms(props(("fg-ts", "1767225600000"), ("fg-ts", "1767225600999")))
        == 1_767_225_600_999
    )


@pytest.mark.parametrize(
    "value", ["", "12", "abc", "-767225600123", "17672256001234", "1767225600.12", "١٧٦٧٢٢٥٦٠٠١٢٣"]
)
def test_arrival_ms_refuses_what_is_no_stamp(value: str) -> None:
    assert arrival_ms(props((STAMP_PROPERTY, value))) is None


def test_session_properties_ask_for_a_session_that_survives_the_collector() -> None:
    assert session_properties().SessionExpiryInterval == 0xFFFFFFFF
    assert session_properties(86400).SessionExpiryInterval == 86400
    with pytest.raises(ValueError, match="session expiry"):
        session_properties(0)


# --- finding and building the plugin -------------------------------------------------------


def test_broker_conf_builds_the_plugin_and_prints_the_lines(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # no configuration file is needed
    r = run_fieldgate("broker-conf", "--cache-dir", str(cache), config=tmp_path / "absent.yaml")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# fieldgate: ")
    assert len(lines) == 2
    keyword, path = lines[1].split(" ", 1)
    assert keyword == "plugin"
    so = Path(path)
    assert so.parent == cache
    assert so.name.startswith(f"fieldgate_stamp-{fgbroker.source_digest()}-")
    assert fgbroker.built_from(so) == fgbroker.source_digest()
    built = so.stat().st_mtime_ns
    # with a refusals file, two lines more: a comment and the plugin's option
    r2 = run_fieldgate(
        "broker-conf", "--cache-dir", str(cache), "--refusals-file", "/run/fg/refusals.json"
    )
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.splitlines()[:2] == lines
    assert r2.stdout.splitlines()[3] == "plugin_opt_refusals_file /run/fg/refusals.json"
    r3 = run_fieldgate("broker-conf", "--cache-dir", str(cache), "--refusals-file", "rel.json")
    assert r3.returncode != 0
    assert r3.stderr == (
        "fieldgate: error: --refusals-file must be an absolute path, not rel.json\n"
    )
    # with the broker's log as well, two more (the counts go into the refusals file)
    log = "/var/log/mosquitto/mosquitto.log"
    r4 = run_fieldgate(
        "broker-conf", "--cache-dir", str(cache), "--refusals-file", "/run/fg/refusals.json",
        "--broker-log", log,
    )  # fmt: skip
    assert r4.returncode == 0, r4.stderr
    assert r4.stdout.splitlines()[:4] == r2.stdout.splitlines()
    assert r4.stdout.splitlines()[5:] == [f"plugin_opt_broker_log {log}"]
    r5 = run_fieldgate("broker-conf", "--cache-dir", str(cache), "--broker-log", log)
    assert r5.stderr == (
        "fieldgate: error: --broker-log needs --refusals-file (the counts are written there)\n"
    )
    again = run_fieldgate("broker-conf", "--cache-dir", str(cache))
    assert again.stdout == r.stdout
    assert so.stat().st_mtime_ns == built, "rebuilt although an identical build existed"


def test_broker_conf_names_what_is_missing_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = run_fieldgate("broker-conf", "--cache-dir", str(tmp_path), "--cc", "no-such-cc")
    assert r.returncode == 1
    assert r.stderr == (
        "fieldgate: error: cannot build the Mosquitto stamp plugin: no C compiler 'no-such-cc'\n"
    )
    monkeypatch.setattr(fgbroker, "INCLUDE_DIRS", (tmp_path,))
    with pytest.raises(fgbroker.PluginError) as err:
        fgbroker.build_plugin(tmp_path / "x.so")
    assert str(err.value) == (
        "cannot build the Mosquitto stamp plugin: header mosquitto_broker.h, "
        "mosquitto_plugin.h, mosquitto.h, mqtt_protocol.h missing "
        "(apt-get install libmosquitto-dev mosquitto-dev)"
    )


def test_plugin_lookup_prefers_a_prebuilt_plugin_and_refuses_a_wrong_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(fgbroker.PLUGIN_ENV, raising=False)
    monkeypatch.delenv("CC", raising=False)
    good = fgbroker.build_plugin(tmp_path / "prebuilt" / "fieldgate_stamp.so")
    digest = fgbroker.source_digest()
    cache = tmp_path / "cache"
    # 1. named explicitly, or by the environment
    assert fgbroker.locate_plugin(good, cache_dir=cache) == good
    monkeypatch.setenv(fgbroker.PLUGIN_ENV, str(good))
    assert fgbroker.locate_plugin(cache_dir=cache) == good
    monkeypatch.delenv(fgbroker.PLUGIN_ENV)
    # 2. the installed one (what the Ansible role ships): no build
    assert fgbroker.locate_plugin(cache_dir=cache, installed=good) == good
    assert not cache.exists()
    # a stale installed plugin (built from other source) is passed over: 3. built in the cache
    stale = tmp_path / "stale.so"
    stale.write_bytes(good.read_bytes().replace(digest.encode(), b"0" * len(digest)))
    found = fgbroker.locate_plugin(cache_dir=cache, installed=stale)
    assert found.parent == cache
    assert fgbroker.built_from(found) == digest
    # named explicitly, a wrong plugin is an error with the reason
    with pytest.raises(fgbroker.PluginError, match="was built from source 0000000000000000"):
        fgbroker.locate_plugin(stale)
    text = tmp_path / "text.so"
    text.write_text("not a library")
    with pytest.raises(fgbroker.PluginError, match="is not a shared library"):
        fgbroker.locate_plugin(text)
    other = tmp_path / "other-arch.so"
    head = bytearray(good.read_bytes())
    head[18:20] = (183 if platform.machine() != "aarch64" else 62).to_bytes(2, "little")
    other.write_bytes(bytes(head))
    with pytest.raises(fgbroker.PluginError, match="is built for another architecture"):
        fgbroker.locate_plugin(other)
    r = run_fieldgate("broker-conf", "--plugin", str(stale))
    assert r.returncode == 1
    assert r.stderr.startswith("fieldgate: error: prebuilt Mosquitto stamp plugin unusable: ")
    assert r.stderr.count("\n") == 1


def test_the_wheel_carries_the_plugin_source() -> None:
    source = fgbroker.plugin_source()
    assert b"mosquitto_plugin_init" in source
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    assert '"plugins/*.c"' in pyproject.read_text()


# --- the plugin in a real broker ------------------------------------------------------------


def test_every_message_is_stamped_at_arrival_and_nothing_else_changes(mosquitto: Broker) -> None:
    sub = Session(mosquitto, "stamp-sub").connect()
    before = now_ms()
    publish(mosquitto, [(f"fg/{d}/readings", f"v3 {d} {i}") for i in range(50) for d in "ab"])
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "text/plain"
    props.PayloadFormatIndicator = 1
    props.ResponseTopic = "fg/reply"
    props.CorrelationData = b"\x00\x01corr"
    props.UserProperty = ("a", "1")
    props.UserProperty = ("b", "2")
    publish_v5(mosquitto, [("fg/a/readings", b"v5 with properties", props)])
    after = now_ms()
    got = sub.wait_for(101)
    sub.disconnect()
    for topic in ("fg/a/readings", "fg/b/readings"):
        s = stamps(got, topic)
        assert strictly_increasing(s), f"{topic}: {s}"
        assert before <= min(s) and max(s) <= after + 1000, (before, s, after)
    assert [m.payload for m in got[:100]] == [
        f"v3 {d} {i}".encode() for i in range(50) for d in "ab"
    ]
    last = got[100]
    assert last.payload == b"v5 with properties"
    p = last.properties
    assert p is not None
    assert (p.ContentType, p.PayloadFormatIndicator, p.ResponseTopic, p.CorrelationData) == (
        "text/plain",
        1,
        "fg/reply",
        b"\x00\x01corr",
    )
    assert p.UserProperty[:2] == [("a", "1"), ("b", "2")]
    assert [n for n, _v in p.UserProperty] == ["a", "b", STAMP_PROPERTY]


def test_same_millisecond_messages_get_distinct_increasing_stamps_per_topic(
    tmp_path: Path,
) -> None:
    with running(frozen_broker(tmp_path)) as broker:
        msgs = [(f"fg/{d}/readings", f"{d}{i}") for i in range(5) for d in "ab"]
        got = receive(broker, "frozen-sub", msgs)
    # the clock stands still: each topic counts up from it on its own
    want = [FROZEN_MS + i for i in range(5)]
    assert stamps(got, "fg/a/readings") == want
    assert stamps(got, "fg/b/readings") == want


def test_past_the_table_bound_topics_share_a_counter_and_stay_increasing(tmp_path: Path) -> None:
    # one slot: the smallest table; every topic shares one counter
    with running(frozen_broker(tmp_path, "plugin_opt_slots 1\n")) as broker:
        msgs = [(f"fg/{d}/readings", f"{d}{i}") for i in range(5) for d in "abc"]
        got = receive(broker, "shared-sub", msgs)
    assert [m.stamp for m in got] == [FROZEN_MS + i for i in range(15)]
    for d in "abc":
        assert strictly_increasing(stamps(got, f"fg/{d}/readings"))


def test_a_clock_stepped_back_does_not_repeat_stamps(tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    with running(frozen_broker(tmp_path)) as broker:
        sub = Session(broker, "step-sub").connect()
        publish(broker, [("fg/a/readings", "1"), ("fg/a/readings", "2")])
        sub.wait_for(2)
        clock.write_text("2025-12-31 23:59:00\n")  # one minute back
        publish(broker, [("fg/a/readings", "3"), ("fg/a/readings", "4")])
        sub.wait_for(4)
        clock.write_text("2026-01-01 00:00:10\n")  # and forward again
        publish(broker, [("fg/a/readings", "5")])
        got = sub.wait_for(5)
        sub.disconnect()
    t = FROZEN_MS
    assert [m.stamp for m in got] == [t, t + 1, t + 2, t + 3, t + 10_000]


def test_a_client_cannot_forge_the_stamp(mosquitto: Broker) -> None:
    sub = Session(mosquitto, "forge-sub").connect()
    forged = Properties(PacketTypes.PUBLISH)
    for pair in (
        ("fg-ts", "1000000000000"),
        ("a", "1"),
        ("fg-ts", "9999999999999"),
        ("b", "2"),
    ):
        forged.UserProperty = pair
    before = now_ms()
    publish_v5(mosquitto, [("fg/a/readings", b"forged", forged)])
    after = now_ms()
    (msg,) = sub.wait_for(1)
    sub.disconnect()
    assert msg.properties is not None
    pairs = msg.properties.UserProperty
    assert pairs[:2] == [("a", "1"), ("b", "2")]
    assert len(pairs) == 3
    assert pairs[2][0] == STAMP_PROPERTY
    assert msg.stamp is not None
    assert before <= msg.stamp <= after + 1000
    log = mosquitto.log.read_text()
    assert "fieldgate_stamp: removed a client-supplied fg-ts property" in log


def test_offline_session_backlog_keeps_its_arrival_times(mosquitto: Broker) -> None:
    Session(mosquitto, "offline-sub").connect().disconnect()
    before = now_ms()
    publish(mosquitto, [("fg/a/readings", str(i)) for i in range(20)])
    after = now_ms()
    time.sleep(1.5)  # the collector is away; the backlog waits in the broker
    drained_from = now_ms()
    sub = Session(mosquitto, "offline-sub").connect()
    got = sub.wait_for(20)
    sub.disconnect()
    assert sub.session_present
    s = stamps(got, "fg/a/readings")
    assert strictly_increasing(s)
    assert before <= s[0] and s[-1] <= after + 1000 < drained_from + 1000
    assert [m.payload for m in got] == [str(i).encode() for i in range(20)]


def test_redelivery_with_dup_carries_the_same_stamp(mosquitto: Broker) -> None:
    # a collector that receives and never acknowledges (killed after its commit) ...
    first = Session(mosquitto, "dup-sub", ack=False).connect()
    publish(mosquitto, [("fg/a/readings", str(i)) for i in range(30)])
    seen = first.wait_for(20)  # max_inflight_messages 20: the rest stays queued
    first.drop()
    before = {m.payload: m.stamp for m in seen}
    # ... comes back: the broker sends the unacknowledged ones again, with DUP
    again = Session(mosquitto, "dup-sub").connect()
    got = again.wait_for(30)
    again.disconnect()
    redelivered = [m for m in got if m.dup]
    assert len(redelivered) == len(seen) == 20
    assert {m.payload: m.stamp for m in redelivered} == before
    s = stamps(got, "fg/a/readings")
    assert len(set(s)) == 30 and strictly_increasing(s)


def test_a_v5_collector_takes_over_the_v311_session_and_its_backlog(mosquitto: Broker) -> None:
    """Upgrading a gateway: the MQTT 3.1.1 collector's session (same client id) and what the
    broker queued for it carry over to the v5 collector, stamps included."""
    v311_session(mosquitto, "upgrade-sub", "fg/#")
    publish(mosquitto, [("fg/a/readings", str(i)) for i in range(10)])
    sub = Session(mosquitto, "upgrade-sub").connect()
    got = sub.wait_for(10)
    sub.disconnect()
    assert sub.session_present
    assert [m.payload for m in got] == [str(i).encode() for i in range(10)]
    assert strictly_increasing(stamps(got, "fg/a/readings"))


def test_paho_defaults_would_lose_the_backlog(mosquitto: Broker) -> None:
    """Why session_properties() and clean_start=False: with paho's defaults the broker drops
    the queue (no Session Expiry Interval), or the first connection cleans it."""
    for client_id, connect_kwargs in (
        ("no-expiry", {"clean_start": False}),
        ("first-only", {"properties": session_properties()}),
    ):
        for _round in range(2):
            c = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
            )
            c.username_pw_set(COLLECTOR_USER, COLLECTOR_PASSWORD)
            seen: list[bytes] = []
            subscribed = threading.Event()
            c.on_subscribe = lambda *_a, ev=subscribed: ev.set()
            c.on_message = lambda _c, _u, m, into=seen: into.append(m.payload)
            c.connect(mosquitto.host, mosquitto.port, **connect_kwargs)  # type: ignore[arg-type]
            c.subscribe(f"fg/{client_id}/readings", qos=1)
            c.loop_start()
            assert subscribed.wait(10)
            time.sleep(0.3)
            c.disconnect()
            c.loop_stop()
            if _round == 0:
                publish(mosquitto, [(f"fg/{client_id}/readings", "queued?")])
        assert seen == [], f"{client_id}: the backlog survived after all"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "sigkill"])
def test_stamps_survive_a_broker_restart(mosquitto: Broker, sig: signal.Signals) -> None:
    Session(mosquitto, "restart-sub").connect().disconnect()  # offline, persistent
    watcher = Session(mosquitto, "restart-watch").connect()  # online: sees the stamps now
    publish(mosquitto, [(f"fg/{d}/readings", f"{d}{i}") for i in range(25) for d in "ab"])
    seen = {m.payload: m.stamp for m in watcher.wait_for(50)}
    watcher.disconnect()
    # autosave_on_changes true, autosave_interval 1 (support.Broker): saved by now
    time.sleep(0.5)
    mosquitto.stop(sig)
    mosquitto.start()
    sub = Session(mosquitto, "restart-sub").connect()
    got = sub.wait_for(50)
    sub.disconnect()
    assert sub.session_present
    assert {m.payload: m.stamp for m in got} == seen
    assert len(got) == 50


def test_bad_plugin_options_stop_the_broker_with_one_line(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", extra_conf="plugin_opt_slots 3\n")
    conf = broker.write_conf()
    r = subprocess.run([MOSQUITTO, "-c", str(conf)], capture_output=True, timeout=30, check=False)
    assert r.returncode != 0
    assert "plugin_opt_slots must be a power of two from 1 to 16777216, not '3'" in (
        broker.log.read_text()
    )


def test_the_plugin_line_loads_through_auth_plugin_too(tmp_path: Path) -> None:
    """Mosquitto 2.0 reads ``plugin`` and ``auth_plugin`` alike (src/conf.c)."""
    lines = run_fieldgate("broker-conf").stdout.replace("\nplugin ", "\nauth_plugin ")
    with running(Broker(tmp_path / "broker", stamp=False, extra_conf=lines)) as broker:
        (msg,) = receive(broker, "auth-plugin-sub", [("fg/a/readings", "x")])
    assert msg.stamp is not None


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(header: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([header, len(body)]) + body


def _read(sock: socket.socket, header: int) -> bytes:
    data = sock.recv(4)
    assert data[0] == header, data
    return data


def test_device_retransmission_qos1_is_a_new_message_qos2_keeps_its_stamp(
    tmp_path: Path,
) -> None:
    """What the broker can and cannot tell: a device resending a QoS 1 PUBLISH (DUP, same
    packet id) makes a second message with its own stamp; a QoS 2 resend before PUBREL is
    the same message and keeps the stamp of its first arrival."""
    with running(frozen_broker(tmp_path)) as broker:
        sub = Session(broker, "retransmit-sub").connect()
        with socket.create_connection((broker.host, broker.port), timeout=10) as dev:
            connect = (
                _utf8("MQTT")
                + bytes([4, 0xC2, 0, 60])
                + _utf8("raw-device")
                + _utf8(SENSOR_USER)
                + _utf8(SENSOR_PASSWORD)
            )
            dev.sendall(_packet(0x10, connect))
            assert _read(dev, 0x20)[3] == 0, "CONNACK refused"
            q1 = _utf8("fg/a/readings") + (1).to_bytes(2, "big") + b"q1"
            dev.sendall(_packet(0x32, q1))  # stamp T
            _read(dev, 0x40)
            dev.sendall(_packet(0x32 | 0x08, q1))  # PUBACK lost, say: resent, T+1
            _read(dev, 0x40)
            q2 = _utf8("fg/a/readings") + (2).to_bytes(2, "big") + b"q2"
            dev.sendall(_packet(0x34, q2))  # T+2
            _read(dev, 0x50)
            dev.sendall(_packet(0x34 | 0x08, q2))  # PUBREC lost: resent (T+3, dropped)
            _read(dev, 0x50)
            dev.sendall(_packet(0x62, (2).to_bytes(2, "big")))
            _read(dev, 0x70)
        publish(broker, [("fg/a/readings", "next")])  # T+4
        got = sub.wait_for(4)
        time.sleep(0.3)  # nothing more comes
        sub.disconnect()
    assert [m.payload for m in got] == [b"q1", b"q1", b"q2", b"next"]
    t = FROZEN_MS
    assert [m.stamp for m in got] == [t, t + 1, t + 2, t + 4]
