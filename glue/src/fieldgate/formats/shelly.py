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

from fieldgate.formats.common import (
    Decoded,
    Sample,
    SampleError,
    flatten,
    kind,
    load_json,
    number,
    shown,
    time_ms,
)
from fieldgate.formats.options import Options

STATUS_METHODS = ("NotifyStatus", "NotifyFullStatus")


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
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
    d = Decoded()
    ts = None
    if "ts" in params and opts.payload_time:
        ts = time_ms(params["ts"], "s", opts.tz, "params.ts")
    base = f"{metric}." if metric else ""
    values: list[tuple[str, float]] = []
    for component, status in params.items():
        if component == "ts":
            continue
        name = f"{base}{component}"
        if isinstance(status, dict):
            inner = {k: v for k, v in status.items() if k != "id"}
            values.extend(flatten(inner, f"{name}.", d))
        else:
            v = number(status)
            if v is None:
                d.skip(name, status)
            else:
                values.append((name, v))
    d.samples.append(Sample(values, ts=ts))
    return d
