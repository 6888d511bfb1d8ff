"""The collector's lean MQTT read path (fieldgate.mqttwire), against packets whose properties
paho-mqtt itself encodes."""

from __future__ import annotations

import dataclasses
import struct
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from support import Broker, ConfigFactory
from support import publish as publish_to

from fieldgate import mqttwire
from fieldgate.config import load_config
from fieldgate.mqttlink import Message, MqttLink, read_password

TOPIC = "fieldgate/TH-001/readings"
PAYLOAD = b'{"ts": 1767225600000, "metrics": {"temperature": 21.5}}'


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: str = TOPIC,
    payload: bytes = PAYLOAD,
    *,
    qos: int = 1,
    mid: int = 7,
    props: Properties | None = None,
    dup: bool = False,
) -> bytes:
    """A v5 PUBLISH as the broker sends it (properties encoded by paho)."""
    if props is None:
        props = Properties(PacketTypes.PUBLISH)
    body = struct.pack("!H", len(topic.encode())) + topic.encode()
    if qos:
        body += struct.pack("!H", mid)
    body += props.pack() + payload
    first = 0x30 | (0x08 if dup else 0) | (qos << 1)
    return bytes([first]) + remaining_length(len(body)) + body


def stamped(*pairs: tuple[str, str]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = list(pairs)
    return props


def decode(packet: bytes) -> tuple[int, int, bytes, bytes, int | None] | None:
    (found, upto) = mqttwire.cut(packet)
    assert upto == len(packet) and len(found) == 1
    first, start, end = found[0]
    return mqttwire.decode_publish(packet, first, start, end)


def test_decodes_a_stamped_qos1_publish() -> None:
    got = decode(publish(props=stamped(("fg-ts", "1767225600123")), mid=65535))
    assert got == (65535, 1, TOPIC.encode(), PAYLOAD, 1_767_225_600_123)


def test_the_last_stamp_wins_and_other_properties_are_skipped() -> None:
    props = stamped(("fg-ts", "1767225600000"), ("x", "y"), ("fg-ts", "1767225600999"))
    props.ContentType = "application/json"
    props.MessageExpiryInterval = 60
    props.SubscriptionIdentifier = 300  # two bytes as a variable byte integer
    props.PayloadFormatIndicator = 1
    props.CorrelationData = b"\x00\x01"
    props.ResponseTopic = "r/1"
    got = decode(publish(props=props, dup=True))
    assert got is not None and got[4] == 1_767_225_600_999 and got[3] == PAYLOAD


@pytest.mark.parametrize(
    "value", ["", "176722560012", "17672256001234", "1767225600x23", chr(0xFF10) * 13]
)
def test_a_value_that_is_no_stamp_gives_none(value: str) -> None:
    got = decode(publish(props=stamped(("fg-ts", value))))
    assert got is not None and got[4] is None


@pytest.mark.parametrize("value", ["1767225600123", "0767225600123", "1767225600x23"])
@pytest.mark.parametrize("payload", [b"", PAYLOAD, b"x" * 70_000])
def test_the_usual_layout_decodes_as_any_other(value: str, payload: bytes) -> None:
    """A QoS 1 PUBLISH whose only property is the stamp (read without walking the
    properties) decodes as the same message with one more property does."""
    usual = decode(publish(props=stamped(("fg-ts", value)), payload=payload, mid=65535, dup=True))
    props = stamped(("fg-ts", value))
    props.PayloadFormatIndicator = 0
    other = decode(publish(props=props, payload=payload, mid=65535, dup=True))
    assert usual == other
    assert usual is not None and usual[:4] == (65535, 1, TOPIC.encode(), payload)
    assert usual[4] == (int(value) if value[0] == "1" and value.isdigit() else None)


def test_qos0_has_no_packet_id_and_no_stamp_without_properties() -> None:
    assert decode(publish(qos=0)) == (0, 0, TOPIC.encode(), PAYLOAD, None)


def test_an_empty_payload_and_a_large_one() -> None:
    assert decode(publish(payload=b"")) == (7, 1, TOPIC.encode(), b"", None)
    big = b"x" * 300_000  # a four-byte remaining length
    got = decode(publish(payload=big))
    assert got is not None and got[3] == big


def test_what_paho_must_read_is_left_to_it() -> None:
    assert decode(publish(qos=2)) is None
    # a property a PUBLISH may not carry (Session Expiry Interval, 0x11)
    body = struct.pack("!H", 3) + b"a/b" + struct.pack("!H", 1) + bytes([5, 0x11, 0, 0, 0, 1])
    assert decode(bytes([0x32]) + remaining_length(len(body)) + body) is None
    # a topic length past the packet's end
    body = struct.pack("!H", 200) + b"a/b" + struct.pack("!H", 1) + b"\x00"
    assert decode(bytes([0x32]) + remaining_length(len(body)) + body) is None
    # a property length past the packet's end
    body = struct.pack("!H", 3) + b"a/b" + struct.pack("!H", 1) + b"\x09"
    assert decode(bytes([0x32]) + remaining_length(len(body)) + body) is None


def test_cut_finds_whole_packets_and_stops_at_a_partial_one() -> None:
    packets = [publish(mid=m, payload=b"p%d" % m) for m in range(1, 6)]
    suback = bytes([0x90, 4, 0, 1, 0, 1])
    buf = b"".join(packets[:3]) + suback + b"".join(packets[3:])
    partial = publish(mid=9)[:-3]
    found, upto = mqttwire.cut(buf + partial)
    assert upto == len(buf)
    assert [first for first, _, _ in found] == [0x32, 0x32, 0x32, 0x90, 0x32, 0x32]
    mids = [mqttwire.decode_publish(buf, *f)[0] for f in found if f[0] & 0xF0 == 0x30]  # type: ignore[index]
    assert mids == [1, 2, 3, 4, 5]
    found, upto = mqttwire.cut(buf, 0, 2)
    assert len(found) == 2 and upto == len(packets[0]) + len(packets[1])
    # a lone first byte, or a length still being read, is no packet yet
    assert mqttwire.cut(b"\x32") == ([], 0)
    assert mqttwire.cut(b"\x32\x80\x80") == ([], 0)


def test_cut_refuses_a_length_of_five_bytes() -> None:
    with pytest.raises(mqttwire.Malformed):
        mqttwire.cut(bytes([0x32, 0x80, 0x80, 0x80, 0x80, 0x01]))


def test_pubacks_are_the_bytes_paho_sends() -> None:
    mids = [1, 255, 256, 65535]
    assert mqttwire.pubacks(mids) == b"".join(struct.pack("!BBH", 0x40, 2, m) for m in mids)
    assert mqttwire.pubacks([]) == b""


def _drain(link: MqttLink, want: int, pipe: Connection, secs: float = 30) -> list[Message]:
    """Connect ``link`` and read until it is subscribed and ``want`` messages are in (or
    ``secs`` pass), acknowledging what arrives as it arrives (the broker holds back what
    is over its inflight window until then), then a moment more; disconnect."""
    subscribed: list[bool] = []
    link.on_subscribed = lambda: subscribed.append(True)
    assert link.connect() is None
    got: list[Message] = []
    deadline = time.monotonic() + secs
    settle = 0.0
    while time.monotonic() < (settle or deadline):
        _, rc = link.pump(0.05, pipe, lambda: None, 1000)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        messages, _ = link.take()
        got += messages
        assert link.ack([(m[0], m[1]) for m in messages]) == mqtt.MQTT_ERR_SUCCESS
        if subscribed and len(got) >= want and not settle:
            settle = time.monotonic() + 0.5
    assert subscribed
    link.disconnect(time.monotonic() + 5)
    return got


def test_lean_and_paho_reads_agree_on_a_real_broker(
    mosquitto: Broker, config_file: ConfigFactory
) -> None:
    """The same stamped messages through the lean path and through paho's own read path; the
    PUBACKs of both end the messages on the broker (a second session start gets nothing)."""
    cfg = load_config(str(config_file(broker=mosquitto)))
    password = read_password(cfg)
    here, _there = Pipe()
    topics = ["fieldgate/+/readings", "tele/+/SENSOR"]
    sessions = (("lean", True), ("paho", False))

    def link(client_id: str, lean: bool) -> MqttLink:
        m = dataclasses.replace(cfg.mqtt, client_id=client_id)
        made = MqttLink(m, password, topics=topics, on_up=lambda: None)
        assert made.lean  # the pinned paho has what the lean path needs
        made.lean = lean
        return made

    for client_id, lean in sessions:
        _drain(link(client_id, lean), 0, here)  # the sessions exist before the messages
    messages = [
        (f"fieldgate/TH-{i % 3}/readings", f'{{"n": {i}}}')
        for i in range(1500)  # < 2000
    ]  # within Receive Maximum (2000)
    messages.append(("tele/TH-0/SENSOR", ""))
    messages.append(("tele/TH-1/SENSOR", "x" * 700_000))  # more than one read of the socket
    publish_to(mosquitto, messages)
    got = {lean: _drain(link(cid, lean), len(messages), here) for cid, lean in sessions}
    lean_rows = [(q, t, p, s) for _, q, t, p, _, s in got[True]]
    paho_rows = [(q, t, p, s) for _, q, t, p, _, s in got[False]]
    assert lean_rows == paho_rows
    assert [(t, p.decode()) for _, t, p, _ in lean_rows] == messages
    assert all(s is not None for *_, s in lean_rows)  # the broker's arrival stamps
    # What was read and acknowledged is not sent again. (Checked on new sessions with a
    # few messages: the test broker's max_inflight_messages is 20; Mosquitto 2.0.11 sends a
    # resumed session's backlog past that window and then sends most of it again on the
    # next connection, however it was acknowledged, through paho's own ack() too.)
    fresh = (("lean-2", True), ("paho-2", False))
    for cid, lean in fresh:
        _drain(link(cid, lean), 0, here)
    publish_to(mosquitto, messages[:10])
    for cid, lean in fresh:
        again = _drain(link(cid, lean), 10, here)
        assert [(t, p.decode()) for _, _, t, p, _, _ in again] == messages[:10]
        assert _drain(link(cid, lean), 1, here, secs=2) == []
