"""``tasmota``: Tasmota's telemetry, ``tele/<topic>/SENSOR`` (and ``STATE``).

One JSON object per message: ``Time`` is the device's local time (zone-less, read in the
input's ``timezone``; with a zone when the device is set to add one), every other key is a
reading, sensors nested by name (``AM2301.Temperature``, ``DS18B20-1.Temperature``,
``ENERGY.Power``). Strings such as ``TempUnit``, a sensor's ``Id`` or ``ENERGY.TotalStartTime``
are not readings (skipped and counted); ``"POWER": "ON"`` is 1.
"""

from __future__ import annotations

from typing import Any

from fieldgate.formats.common import Decoded, decode_object, read_object
from fieldgate.formats.options import Options

TIME_KEY = "Time"


def read(
    text: str, opts: Options, metric: str | None, out: list[Any], skipped: list[Any]
) -> int | None:
    """The one reading of a payload (:func:`~fieldgate.formats.common.read_object`)."""
    # Tasmota writes Time as text; a number there would be epoch seconds
    return read_object(
        text, opts, metric, out, skipped, what="Tasmota", ts_key=TIME_KEY, ts_unit="s"
    )


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    return decode_object(read, text, opts, metric)
