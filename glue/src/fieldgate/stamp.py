"""The collector's side of the broker's arrival stamp (see :mod:`fieldgate.broker`).

The broker's plugin gives every incoming message the MQTT v5 user property ``fg-ts``: the
arrival time at the broker in UTC epoch milliseconds, strictly increasing per topic, the
same on every delivery of that message (queued, restored after a broker restart, resent with
DUP). A reading without a time of its own takes that stamp, so it keeps its own time however
late the collector drains it, and a redelivery after a crash between commit and
acknowledgement is the same row under the store's key (device, ts, metric).

User properties reach only an MQTT v5 client. A v5 persistent session with paho-mqtt 2.x needs
all of these (each default is wrong for a collector):

- ``mqtt.Client(..., protocol=mqtt.MQTTv5, manual_ack=True)`` and no ``clean_session``
  argument (paho raises ``ValueError`` for it with v5);
- ``client.connect(..., clean_start=False, properties=session_properties())``: paho's default
  ``MQTT_CLEAN_START_FIRST_ONLY`` starts the first connection of every process with a clean
  session, which throws the broker's backlog away at each collector restart; and without a
  Session Expiry Interval (default 0) the broker ends the session, queue and all, as soon
  as the collector disconnects;
- ``client.ack(mid, qos)`` for every message, in the order received (MQTT 5 §4.6), after the
  commit that holds its readings.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

#: The user property the broker plugin sets (and strips from clients).
STAMP_PROPERTY = "fg-ts"
#: Session Expiry Interval meaning "never expires" (what MQTT 3.1.1 clean_session=0 means).
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
# Accepted range: 2001-09-09 .. 2286-11-20 (13 decimal digits); anything else is not a stamp.
_MIN_MS = 1_000_000_000_000
_MAX_MS = 9_999_999_999_999


def arrival_ms(properties: Any) -> int | None:
    """The broker's arrival stamp of a message, or ``None`` when it has none.

    ``properties`` is ``MQTTMessage.properties`` (``None`` for MQTT 3.1.1). The plugin removes
    any ``fg-ts`` a client sent and appends its own, so the last one is the broker's. A value
    that is not 13 decimal digits is no stamp (``None``): the caller falls back to its own
    receive time and says so.
    """
    pairs = getattr(properties, "UserProperty", None)
    if not pairs:
        return None
    for name, value in reversed(pairs):
        if name == STAMP_PROPERTY:
            return stamp_value(value)
    return None


def stamp_value(value: str | bytes) -> int | None:
    """The ``fg-ts`` property's value (text, or its UTF-8 bytes as read off the wire) as
    epoch milliseconds, or ``None`` when it is not 13 decimal digits in the accepted range."""
    if len(value) == 13 and value.isascii() and value.isdigit():
        ms = int(value)
        return ms if _MIN_MS <= ms <= _MAX_MS else None
    return None


def session_properties(expiry_secs: int = SESSION_NEVER_EXPIRES) -> Properties:
    """CONNECT properties of a persistent v5 session (pass with ``clean_start=False``)."""
    if not 0 < expiry_secs <= SESSION_NEVER_EXPIRES:
        raise ValueError(f"session expiry must be 1..{SESSION_NEVER_EXPIRES} s, not {expiry_secs}")
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_secs
    return props
