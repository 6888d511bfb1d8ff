"""``shelly``: Shelly Gen2+ status notifications on ``<device id>/events/rpc``.

A ``NotifyStatus`` (what changed) or ``NotifyFullStatus`` (everything) frame carries
``params``: ``ts`` (epoch seconds with a fraction: the reading's time) and one object per
component, named ``<type>`` or ``<type>:<id>`` (``switch:0``, ``temperature:0``). Each
component's values are readings named ``<component>.<key>``, nested objects flattened:
``temperature:0.tC``, ``switch:0.aenergy.total``, ``switch:0.output`` (true is 1). The
component's own ``id`` repeats its name and is left out. Other methods on the topic
(``NotifyEvent``: a button press) carry no status: such a message is rejected with that
reason.
"""

from __future__ import annotations

from typing import Any

from fieldgate.formats.common import (
    Decoded,
    SampleError,
    decode_object,
    flatten_pairs,
    kind,
    load_json,
    number,
    shown,
    time_ms,
)
from fieldgate.formats.options import Options

STATUS_METHODS = ("NotifyStatus", "NotifyFullStatus")


def read(
    text: str, opts: Options, metric: str | None, out: list[Any], skipped: list[Any]
) -> int | None:
    """The one reading of a payload, as an object format's reader
    (:data:`~fieldgate.formats.common.ObjectReader`): its values added to ``out`` as flat
    pairs, those that are not readings to ``skipped``; its ``params.ts`` returned (a time
    that cannot be read is the whole payload's SampleError)."""
    doc = load_json(text)
    if not isinstance(doc, dict):
        raise SampleError(f"expected a Shelly RPC frame (a JSON object), got {kind(doc)}")
    method = doc.get("method")
    if method not in STATUS_METHODS:
        raise SampleError(
            f"method {shown(method)} is not a status notification ({', '.join(STATUS_METHODS)})"
        )
    params = doc.get("params")
    if not isinstance(params, dict):
        raise SampleError(f"params: expected an object, got {kind(params)}")
    ts = None
    if "ts" in params and opts.payload_time:
        ts = time_ms(params["ts"], "s", opts.tz, "params.ts")
    base = f"{metric}." if metric else ""
    for component, status in params.items():
        if component == "ts":
            continue
        name = f"{base}{component}"
        if isinstance(status, dict):
            status.pop("id", None)  # a fresh document: the component's id is no reading
            flatten_pairs(status, f"{name}.", out, skipped)
        else:
            v = number(status)
            if v is None:
                skipped.append((name, status))
            else:
                out += (name, v)
    return ts


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    return decode_object(read, text, opts, metric)
