"""The collector's lean read path: MQTT packets cut from a receive buffer, PUBLISH decoded
without per-message objects, PUBACKs of a whole commit packed into one write.

Why: paho-mqtt reads a packet with three ``recv`` calls (command byte, length, body), then
builds an ``MQTTMessage`` (with a ``threading.Condition``) and an MQTT v5 ``Properties``
object for every message; for a drain of small messages that was about 45 µs of the
collector's 50 µs per message (docs/benchmarks.md#collector). Here one ``recv`` takes
whatever the socket holds (hundreds of messages), :func:`cut` walks the packets in it and
:func:`decode_publish` reads a PUBLISH into the tuple the collector keeps (topic, packet
id, payload and the broker's arrival stamp ``fg-ts``, docs/arrival-stamp.md). Every other
packet (CONNACK, SUBACK, PINGRESP, DISCONNECT, ...) and any PUBLISH this module does not
read (QoS 2, a property it does not know) goes to paho's own handler, so paho keeps the
session: :class:`fieldgate.mqttlink.MqttLink` does that.

:func:`pubacks` encodes the acknowledgements of a commit as one buffer: a v5 PUBACK with
reason Success and no properties is the 4 bytes ``0x40 0x02 <packet id>`` (MQTT 5
§3.4.2.1), the same bytes paho sends for ``client.ack``.
"""

from __future__ import annotations

import struct

from fieldgate.stamp import STAMP_PROPERTY, stamp_value

#: MQTT control packet types (the high nibble of the first byte).
PUBLISH = 0x30
PUBACK = 0x40

_STAMP_NAME = STAMP_PROPERTY.encode()
_USER_PROPERTY = 0x26
#: PUBLISH properties other than User Property: identifier -> how its value is laid out
#: (a fixed size in bytes, or :data:`_STRING` for a two-byte length and that many bytes,
#: :data:`_VARINT` for a variable byte integer). MQTT 5 §3.3.2.3.
_STRING = -1
_VARINT = -2
_PUBLISH_PROPERTIES: dict[int, int] = {
    0x01: 1,  # Payload Format Indicator
    0x02: 4,  # Message Expiry Interval
    0x03: _STRING,  # Content Type
    0x08: _STRING,  # Response Topic
    0x09: _STRING,  # Correlation Data
    0x0B: _VARINT,  # Subscription Identifier
    0x23: 2,  # Topic Alias
}

#: What follows the packet id of the usual PUBLISH from a broker with the stamp plugin: a
#: Property Length of 23 and one User Property, ``fg-ts`` with a value of 13 bytes (the
#: stamp itself follows: 13 bytes, then the payload).
_STAMP_ONLY = bytes([23, _USER_PROPERTY, 0, len(_STAMP_NAME)]) + _STAMP_NAME + bytes([0, 13])
#: Where the stamp's 13 bytes start, counted from the packet id.
_STAMPED_AT = 2 + len(_STAMP_ONLY)

Cut = tuple[int, int, int]
"""(first byte, start of the variable header, end) of one packet in a buffer."""


class Malformed(ValueError):
    """The bytes are no MQTT packet (the connection cannot go on)."""


def cut(buf: bytes | bytearray, pos: int = 0, limit: int | None = None) -> tuple[list[Cut], int]:
    """The complete packets in ``buf`` from ``pos`` (at most ``limit``) and where the first
    incomplete one starts. Raises :class:`Malformed` for a length of more than 4 bytes."""
    n = len(buf)
    found: list[Cut] = []
    append = found.append
    left = -1 if limit is None else limit
    while left and pos + 2 <= n:
        i = pos + 1
        b = buf[i]
        length = b & 127
        i += 1
        if b & 128:
            shift = 7
            while True:
                if i >= n:
                    return found, pos
                b = buf[i]
                i += 1
                length |= (b & 127) << shift
                if not b & 128:
                    break
                shift += 7
                if shift > 21:
                    raise Malformed("a remaining length of more than 4 bytes")
        end = i + length
        if end > n:
            break
        append((buf[pos], i, end))
        pos = end
        left -= 1
    return found, pos


def decode_publish(
    buf: bytes | bytearray, first: int, start: int, end: int
) -> tuple[int, int, bytes, bytes, int | None] | None:
    """(packet id, QoS, topic bytes, payload, arrival stamp or None) of an MQTT v5 PUBLISH
    of QoS 0 or 1 at ``buf[start:end]`` (its variable header and payload); None when it is
    one for paho to read (QoS 2, a property this module does not know, a bad length)."""
    qos = (first >> 1) & 3
    if qos > 1 or end - start < 2:
        return None
    j = start + 2 + ((buf[start] << 8) | buf[start + 1])
    if qos and j + _STAMPED_AT + 13 <= end and buf[j + 2 : j + _STAMPED_AT] == _STAMP_ONLY:
        # the usual one: QoS 1, the arrival stamp its only property
        return (
            (buf[j] << 8) | buf[j + 1],
            1,
            bytes(buf[start + 2 : j]),
            bytes(buf[j + _STAMPED_AT + 13 : end]),
            stamp_value(buf[j + _STAMPED_AT : j + _STAMPED_AT + 13]),
        )
    if j + 2 * qos + 1 > end:
        return None
    topic = bytes(buf[start + 2 : j])
    mid = 0
    if qos:
        mid = (buf[j] << 8) | buf[j + 1]
        j += 2
    # Property Length (a variable byte integer)
    b = buf[j]
    plen = b & 127
    j += 1
    shift = 7
    while b & 128:
        if j >= end or shift > 21:
            return None
        b = buf[j]
        j += 1
        plen |= (b & 127) << shift
        shift += 7
    p, props_end = j, j + plen
    if props_end > end:
        return None
    stamp: int | None = None
    while p < props_end:
        pid = buf[p]
        p += 1
        if pid == _USER_PROPERTY:
            if p + 2 > props_end:
                return None
            key_len = (buf[p] << 8) | buf[p + 1]
            key_at = p + 2
            p = key_at + key_len
            if p + 2 > props_end:
                return None
            value_len = (buf[p] << 8) | buf[p + 1]
            value_at = p + 2
            p = value_at + value_len
            if p > props_end:
                return None
            # The plugin strips any fg-ts a client sent and appends its own: the last wins.
            if buf[key_at : key_at + key_len] == _STAMP_NAME:
                stamp = stamp_value(bytes(buf[value_at:p]))
            continue
        layout = _PUBLISH_PROPERTIES.get(pid)
        if layout is None:
            return None
        if layout == _STRING:
            if p + 2 > props_end:
                return None
            p += 2 + ((buf[p] << 8) | buf[p + 1])
        elif layout == _VARINT:
            while p < props_end and buf[p] & 128:
                p += 1
            p += 1
        else:
            p += layout
    if p != props_end:
        return None
    return mid, qos, topic, bytes(buf[props_end:end]), stamp


def pubacks(mids: list[int]) -> bytes:
    """The v5 PUBACKs (reason Success) of ``mids``, in that order, as one buffer."""
    return struct.pack(f">{len(mids)}I", *[0x40020000 | mid for mid in mids])
