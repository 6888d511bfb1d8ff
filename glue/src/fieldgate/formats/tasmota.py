"""``tasmota``: Tasmota's telemetry, ``tele/<topic>/SENSOR`` (and ``STATE``).

One JSON object per message: ``Time`` is the device's local time (zone-less, read in the
input's ``timezone``; with a zone when the device is set to add one), every other key is a
reading, sensors nested by name (``AM2301.Temperature``, ``DS18B20-1.Temperature``,
``ENERGY.Power``). Strings such as ``TempUnit``, a sensor's ``Id`` or ``ENERGY.TotalStartTime``
are not readings (skipped and counted); ``"POWER": "ON"`` is 1.
"""

from __future__ import annotations

from fieldgate.formats.common import Decoded, SampleError, kind, load_json, object_sample
from fieldgate.formats.options import Options

TIME_KEY = "Time"


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    doc = load_json(text)
    if not isinstance(doc, dict):
        raise SampleError(f"expected a Tasmota JSON object, got {kind(doc)}")
    d = Decoded()
    # A number in Time would be epoch seconds (Tasmota writes text).
    d.samples.append(
        object_sample(doc, ts_key=TIME_KEY, ts_unit="s", opts=opts, metric=metric, into=d)
    )
    return d
