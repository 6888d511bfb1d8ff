"""The read API (docs/contract.md §11): readings of one device and metric, raw or in time
buckets, and the extent of a gateway's data; only for gateways the caller may see.

- ``GET /api/v1/readings?serial=S&device=D&metric=M[&from=T][&to=T][&format=csv]``: raw
  readings with ``from <= ts < to``, streamed: ``{"readings": [{"ts", "value"}, ...]}`` or
  CSV ``ts,value``. There is no row limit: the database hands the rows over in chunks
  (a server-side cursor on PostgreSQL, keyset pages on SQLite), so a year of 1 Hz data
  costs the hub the same memory as a minute of it.
- the same with ``every=SECONDS``: one row per time bucket holding readings, ``{"ts":
  bucket start, "min", "max", "mean", "count"}``, computed by the database (GROUP BY).
  Buckets start at ``from`` (or at the epoch: ``every=60`` gives whole UTC minutes). At
  most :data:`MAX_BUCKETS` per request: more is a 400 that says how to narrow it.
- ``GET /api/v1/extent?serial=S[&device=D][&format=csv]``: per device and metric the
  first and last ts and the count.

Times are epoch milliseconds or RFC 3339 (``2026-01-01T00:00:00Z``, with an offset or a
fraction); every bad parameter is a 400 naming it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Iterator

from flask import Blueprint, Response, jsonify, request

from fieldgate.hub.auth import require_user
from fieldgate.hub.fleet import visible_gateway
from fieldgate.hub.storage import BUCKET_FIELDS, EXTENT_FIELDS, Series
from fieldgate.hub.web import ApiError, storage

query = require_user(Blueprint("query", __name__, url_prefix="/api/v1"))

#: Readings carry ts in [0, 2**53) ms (fieldgate.batchfile.MAX_TS).
MAX_TS = 2**53
#: The most buckets one ``every=`` request may ask for.
MAX_BUCKETS = 100_000
#: The widest bucket (its milliseconds must stay below MAX_TS).
MAX_EVERY_SECS = (MAX_TS - 1) // 1000
#: Rows per piece of a streamed answer.
PIECE = 2000
FORMATS = ("json", "csv")
#: The longest device or metric name the hub looks up.
MAX_NAME = 256

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_time(name: str, text: str) -> int:
    """A time parameter as epoch ms: digits (epoch ms) or RFC 3339; 400 otherwise."""
    if text.isascii() and text.isdigit():
        ms = int(text) if len(text) <= 16 else MAX_TS + 1
    elif _RFC3339.match(text):
        fraction = re.search(r"\.(\d+)", text)
        whole = re.sub(r"\.\d+", "", text).upper().replace("Z", "+00:00")
        try:
            moment = dt.datetime.fromisoformat(whole)
        except ValueError:
            raise ApiError(400, f"{name}={text!r:.40} is not a valid date and time") from None
        ms = (moment - _EPOCH) // dt.timedelta(milliseconds=1)
        if fraction:
            ms += int(fraction.group(1)[:3].ljust(3, "0"))
    else:
        raise ApiError(
            400,
            f"{name}={text!r:.40} is not a time: give epoch milliseconds or RFC 3339 "
            "(2026-01-01T00:00:00Z)",
        )
    if not 0 <= ms <= MAX_TS:
        raise ApiError(400, f"{name}={text!r:.40} is outside 1970 to the year 287396")
    return ms


def _params(allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, str]:
    """The query string as a dict: 400 for an unknown, repeated, missing or empty one."""
    args = request.args
    for key in args:
        if key not in allowed:
            raise ApiError(400, f"unknown parameter {key!r:.40}; this takes {', '.join(allowed)}")
        if len(args.getlist(key)) > 1:
            raise ApiError(400, f"the parameter {key} is given more than once")
    out = {k: args[k] for k in args}
    for key in required:
        if not out.get(key):
            raise ApiError(400, f"the parameter {key} is missing")
    for key in ("device", "metric"):
        if key in out and not 0 < len(out[key]) <= MAX_NAME:
            raise ApiError(400, f"the parameter {key} must be 1 to {MAX_NAME} characters")
    fmt = out.get("format", "json")
    if fmt not in FORMATS:
        raise ApiError(400, f"format={fmt!r:.20} is not known; use json or csv")
    return out


def _range(p: dict[str, str]) -> tuple[int, int]:
    start = parse_time("from", p["from"]) if "from" in p else 0
    end = parse_time("to", p["to"]) if "to" in p else MAX_TS
    if start > end:
        raise ApiError(400, f"from ({p['from']}) is after to ({p['to']})")
    return start, end


def _every(text: str) -> int:
    """``every=SECONDS`` as milliseconds."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ApiError(400, f"every={text!r:.40} must be a whole number of seconds, at least 1")
    if len(text) > 12 or int(text) > MAX_EVERY_SECS:
        raise ApiError(400, f"every={text:.20} is more than the {MAX_EVERY_SECS} s there are")
    return int(text) * 1000


def bucket_count(series: Series, start: int, end: int, every: int, origin: int) -> int:
    """The most buckets a query can fill: those between the series' first and last
    reading inside [start, end)."""
    if series.first_ts is None or series.last_ts is None:
        return 0
    lo, hi = max(start, series.first_ts), min(end, series.last_ts + 1)
    if lo >= hi:
        return 0
    return (hi - 1 - origin) // every - (lo - origin) // every + 1


def _json_number(v: float) -> str:
    return repr(float(v))


def csv_field(text: str) -> str:
    """A CSV field as csv.writer writes it (quoted when it holds a comma, quote or line break)."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _stream(
    rows: Iterable[tuple[str, ...]], fields: tuple[str, ...], fmt: str, wrap: str
) -> Response:
    """Rows of formatted fields as JSON ``{wrap: [{field: value}, ...]}`` or CSV with a
    header line, streamed in pieces of :data:`PIECE` rows."""
    line: Callable[[tuple[str, ...]], str]
    if fmt == "csv":
        head, sep, tail, mimetype = ",".join(fields) + "\n", "", "", "text/csv"

        def line(values: tuple[str, ...]) -> str:
            return ",".join(values) + "\n"

    else:
        keys = [f'"{f}":' for f in fields]
        head, sep, tail, mimetype = f'{{"{wrap}":[', ",", "]}", "application/json"

        def line(values: tuple[str, ...]) -> str:
            return "{" + ",".join(k + v for k, v in zip(keys, values, strict=True)) + "}"

    def pieces() -> Iterator[str]:
        yield head
        first = True
        piece: list[str] = []
        for row in rows:
            piece.append(line(row))
            if len(piece) >= PIECE:
                yield ("" if first else sep) + sep.join(piece)
                first = False
                piece.clear()
        if piece:
            yield ("" if first else sep) + sep.join(piece)
        yield tail

    return Response(pieces(), mimetype=mimetype)


@query.get("/readings")
def readings() -> Response:
    p = _params(
        ("serial", "device", "metric", "from", "to", "every", "format"),
        ("serial", "device", "metric"),
    )
    start, end = _range(p)
    every = _every(p["every"]) if "every" in p else None
    serial = visible_gateway(p["serial"])["serial"]
    st = storage()
    series = st.series(serial, p["device"], p["metric"])
    if series is None:
        raise ApiError(
            404, f"gateway {serial} has no readings of {p['device']!r:.60} {p['metric']!r:.60}"
        )
    fmt = p.get("format", "json")
    if every is None:
        raw = ((str(ts), _json_number(v)) for ts, v in st.readings(series.id, start, end))
        return _stream(raw, ("ts", "value"), fmt, "readings")
    origin = start
    n = bucket_count(series, start, end, every, origin)
    if n > MAX_BUCKETS:
        raise ApiError(
            400,
            f"every={p['every']} over this range gives up to {n} buckets, more than the "
            f"{MAX_BUCKETS} one request may have: raise every or narrow from/to",
        )
    buckets = (
        (str(b), _json_number(lo), _json_number(hi), _json_number(mean), str(count))
        for b, lo, hi, mean, count in st.buckets(series.id, start, end, every, origin)
    )
    return _stream(buckets, BUCKET_FIELDS, fmt, "readings")


@query.get("/extent")
def extent() -> Response:
    p = _params(("serial", "device", "format"), ("serial",))
    serial = visible_gateway(p["serial"])["serial"]
    found = storage().extent(serial, p.get("device"))
    if "device" in p and not found:
        raise ApiError(404, f"gateway {serial} has no readings of device {p['device']!r:.60}")
    fmt = p.get("format", "json")
    if fmt == "json":
        return jsonify(serial=serial, series=found)
    rows = (
        (csv_field(d["device"]), csv_field(d["metric"]), *(str(d[k]) for k in EXTENT_FIELDS[2:]))
        for d in found
    )
    return _stream(rows, EXTENT_FIELDS, "csv", "series")
