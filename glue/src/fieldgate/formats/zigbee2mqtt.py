"""``zigbee2mqtt``: Zigbee2MQTT's device state, ``zigbee2mqtt/<friendly name>``.

One JSON object per message, every key a reading (``temperature``, ``linkquality``,
``update.installed_version``); ``"state": "ON"`` and ``true`` are 1. ``last_seen`` (when
Zigbee2MQTT's ``advanced.last_seen`` is on: ISO 8601 with a zone, or epoch milliseconds) is
the reading's time; without it the reading takes the broker's arrival stamp. Nulls,
strings (``update.state: "idle"``, ``action``) and arrays are skipped and counted.
"""

from __future__ import annotations

from functools import partial

from fieldgate.formats.common import Decoded, ObjectReader, decode_object, read_object
from fieldgate.formats.options import Options

TIME_KEY = "last_seen"


#: The one reading of a payload (:func:`~fieldgate.formats.common.read_object`).
read: ObjectReader = partial(read_object, "Zigbee2MQTT", TIME_KEY, "ms")


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    return decode_object(read, text, opts, metric)
