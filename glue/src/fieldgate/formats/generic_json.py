"""``json``: any JSON object (or array of objects) with the places of its time and its
metrics named by the input.

- ``ts_path``: dotted path of the sample's time (``time``, ``meta.ts``): epoch in
  ``ts_unit`` (default ms) or an ISO 8601 date-time (zone-less: the input's ``timezone``).
  Without ``ts_path`` the readings take the arrival stamp; with it, a sample without that
  key is rejected.
- ``metrics_path``: dotted path of the object holding the metrics (default: the whole
  object, less ``ts_path``); nested objects are flattened with ``.``.
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
    path_get,
    time_ms,
)
from fieldgate.formats.options import Options


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    doc = load_json(text)
    d = Decoded()
    for label, obj in objects(doc, "a JSON object or an array of objects"):
        try:
            d.samples.append(_sample(obj, opts, metric, d, label))
        except SampleError as exc:
            d.samples.append(Sample([], label=label, error=str(exc)))
    return d


def _without(obj: dict[str, Any], path: list[str]) -> dict[str, Any]:
    """A copy of ``obj`` without the value at ``path`` (the time is not a metric)."""
    head, *rest = path
    if head not in obj:
        return obj
    copy = dict(obj)
    if rest and isinstance(copy[head], dict):
        copy[head] = _without(copy[head], rest)
    else:
        del copy[head]
    return copy


def _sample(obj: Any, opts: Options, metric: str | None, d: Decoded, label: str) -> Sample:
    if not isinstance(obj, dict):
        raise SampleError(f"expected an object, got {kind(obj)}")
    ts = None
    if opts.ts_path:
        try:
            raw = path_get(obj, opts.ts_path)
        except KeyError:
            raise SampleError(f"{opts.ts_path} (ts_path): missing") from None
        if opts.payload_time:
            ts = time_ms(raw, opts.ts_unit, opts.tz, opts.ts_path)
        obj = _without(obj, opts.ts_path.split("."))
    body: Any = obj
    if opts.metrics_path:
        try:
            body = path_get(obj, opts.metrics_path)
        except KeyError:
            raise SampleError(f"{opts.metrics_path} (metrics_path): missing") from None
        if not isinstance(body, dict):
            raise SampleError(
                f"{opts.metrics_path} (metrics_path): expected an object, got {kind(body)}"
            )
    return Sample(flatten(body, f"{metric}." if metric else "", d), ts=ts, label=label)
