"""Payload formats of devices as they are (docs/contract.md §9, docs/inputs.md).

Each format is a small pure function ``decode(text, options, metric) -> Decoded`` in a
module of its own: it reads one payload (its text, the input's prepared :class:`Options`,
and the topic's ``{metric}`` level if the template has one) into samples of
``(metric, value)`` pairs, each with the payload's own time where the format has one, and
counts the values that are not readings. Devices, time bounds, metric name shapes and the
arrival stamp are :mod:`fieldgate.readings`' business, the same for every format.

``fieldgate`` (docs/contract.md §4) is not here: :mod:`fieldgate.readings` parses it.
"""

from __future__ import annotations

from collections.abc import Callable

from fieldgate.formats import (
    csvlines,
    generic_json,
    influx,
    shelly,
    tasmota,
    thingsboard,
    value,
    zigbee2mqtt,
)
from fieldgate.formats.common import Decoded, ObjectReader, Sample, SampleError
from fieldgate.formats.options import CsvSpec, Options, options_from

Decoder = Callable[[str, Options, "str | None"], Decoded]

#: Every format a decoder reads, by its configuration name.
DECODERS: dict[str, Decoder] = {
    "csv": csvlines.decode,
    "value": value.decode,
    "json": generic_json.decode,
    "tasmota": tasmota.decode,
    "zigbee2mqtt": zigbee2mqtt.decode,
    "shelly": shelly.decode,
    "influx": influx.decode,
    "thingsboard": thingsboard.decode,
}

#: The formats whose payload is one object, by name: the one reader each decoder above
#: wraps, which the store writer's cheap path calls for rows without the decoded objects.
OBJECT_READERS: dict[str, ObjectReader] = {
    "tasmota": tasmota.read,
    "zigbee2mqtt": zigbee2mqtt.read,
    "shelly": shelly.read,
}

#: The native format of docs/contract.md §4 (parsed by fieldgate.readings).
NATIVE = "fieldgate"

#: Every format name an input or poll node may give.
FORMAT_NAMES: tuple[str, ...] = (NATIVE, *DECODERS)

__all__ = [
    "DECODERS",
    "FORMAT_NAMES",
    "NATIVE",
    "OBJECT_READERS",
    "CsvSpec",
    "Decoded",
    "Decoder",
    "ObjectReader",
    "Options",
    "Sample",
    "SampleError",
    "options_from",
]
