"""``zigbee2mqtt``: Zigbee2MQTT's device state, ``zigbee2mqtt/<friendly name>``.

One JSON object per message, every key a reading (``temperature``, ``linkquality``,
``update.installed_version``); ``"state": "ON"`` and ``true`` are 1. ``last_seen`` (when
Zigbee2MQTT's ``advanced.last_seen`` is on: ISO 8601 with a zone, or epoch milliseconds) is
the reading's time; without it the reading takes the broker's arrival stamp. Nulls,
strings (``update.state: "idle"``, ``action``) and arrays are skipped and counted.
"""

from __future__ import annotations

from typing import Any

from fieldgate.formats.common import Decoded, decode_object, read_object
from fieldgate.formats.options import Options

TIME_KEY = "last_seen"


def read(
    text: str, opts: Options, metric: str | None, out: list[Any], skipped: list[Any]
) -> int | None:
    """The one reading of a payload (:func:`~fieldgate.formats.common.read_object`)."""
    return read_object(
        text, opts, metric, out, skipped, what="Zigbee2MQTT", ts_key=TIME_KEY, ts_unit="ms"
    )


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    return decode_object(read, text, opts, metric)
