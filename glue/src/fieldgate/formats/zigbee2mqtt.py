"""``zigbee2mqtt``: Zigbee2MQTT's device state, ``zigbee2mqtt/<friendly name>``.

One JSON object per message, every key a reading (``temperature``, ``linkquality``,
``update.installed_version``); ``"state": "ON"`` and ``true`` are 1. ``last_seen`` (when
Zigbee2MQTT's ``advanced.last_seen`` is on: ISO 8601 with a zone, or epoch milliseconds) is
the reading's time; without it the reading takes the broker's arrival stamp. Nulls,
strings (``update.state: "idle"``, ``action``) and arrays are skipped and counted.
"""

from __future__ import annotations

from fieldgate.formats.common import Decoded, SampleError, kind, load_json, object_sample
from fieldgate.formats.options import Options

TIME_KEY = "last_seen"


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    doc = load_json(text)
    if not isinstance(doc, dict):
        raise SampleError(f"expected a Zigbee2MQTT JSON object, got {kind(doc)}")
    d = Decoded()
    d.samples.append(
        object_sample(doc, ts_key=TIME_KEY, ts_unit="ms", opts=opts, metric=metric, into=d)
    )
    return d
