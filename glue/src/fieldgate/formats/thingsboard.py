"""``thingsboard``: ThingsBoard's device telemetry (its MQTT API, ``v1/devices/me/telemetry``).

A payload is ``{"ts": <epoch ms>, "values": {...}}``, a plain object of key-values (no time
of its own: the arrival stamp), or an array of either. Nested objects are flattened.
"""

from __future__ import annotations

from typing import Any

from fieldgate.formats.common import (
    Decoded,
    Sample,
    SampleError,
    flatten,
    kind,
    load_json,
    objects,
    time_ms,
)
from fieldgate.formats.options import Options


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    doc = load_json(text)
    d = Decoded()
    for label, obj in objects(doc, "a ThingsBoard object or an array of them"):
        d.samples.append(_sample(obj, opts, metric, d, label))
    return d


def _sample(obj: Any, opts: Options, metric: str | None, d: Decoded, label: str) -> Sample:
    if not isinstance(obj, dict):
        return Sample([], label=label, error=f"expected an object, got {kind(obj)}")
    if "ts" in obj and "values" in obj:
        values = obj["values"]
        if not isinstance(values, dict):
            return Sample([], label=label, error=f"values: expected an object, got {kind(values)}")
        ts = None
        if opts.payload_time:
            try:
                ts = time_ms(obj["ts"], "ms", opts.tz, "ts")
            except SampleError as exc:
                return Sample([], label=label, error=str(exc))
        return Sample(flatten(values, _prefix(metric), d), ts=ts, label=label)
    return Sample(flatten(obj, _prefix(metric), d), label=label)


def _prefix(metric: str | None) -> str:
    return f"{metric}." if metric else ""
