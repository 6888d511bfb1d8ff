"""``tasmota``: Tasmota's telemetry, ``tele/<topic>/SENSOR`` (and ``STATE``).

One JSON object per message: ``Time`` is the device's local time (zone-less, read in the
input's ``timezone``; with a zone when the device is set to add one), every other key is a
reading, sensors nested by name (``AM2301.Temperature``, ``DS18B20-1.Temperature``,
``ENERGY.Power``). Strings such as ``TempUnit``, a sensor's ``Id`` or ``ENERGY.TotalStartTime``
are not readings (skipped and counted); ``"POWER": "ON"`` is 1.
"""

from __future__ import annotations

from functools import partial

from fieldgate.formats.common import Decoded, ObjectReader, decode_object, read_object
from fieldgate.formats.options import Options

TIME_KEY = "Time"


#: The one reading of a payload (:func:`~fieldgate.formats.common.read_object`); Tasmota
#: writes ``Time`` as text, a number there would be epoch seconds.
read: ObjectReader = partial(read_object, "Tasmota", TIME_KEY, "s")


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    return decode_object(read, text, opts, metric)
