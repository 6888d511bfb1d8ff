"""``influx``: InfluxDB line protocol (what Telegraf and many devices write), one point a line.

``<measurement>[,<tag>=<value>...] <field>=<value>[,<field>=<value>...] [<timestamp>]``

- Each field is a reading named ``<measurement>.<field>``; tags are not part of the name.
- Values: floats (``1``, ``-1.5``, ``1e3``), integers ``12i`` and unsigned ``12u``,
  booleans (``t``, ``true``, ``F``, ``FALSE`` …) as 1/0; string fields (``"…"``) are not
  readings (skipped and counted).
- Escapes as the reference defines them: ``\\,`` and ``\\ `` in measurements; ``\\,``,
  ``\\=`` and ``\\ `` in tag keys, tag values and field keys; ``\\"`` and ``\\\\`` inside string
  field values. A backslash before any other character is itself.
- The timestamp, an integer in the input's ``influx_precision`` (default ``ns``), is the
  reading's time; without it the line takes the arrival stamp.
- Blank lines and lines starting with ``#`` (comments) are skipped; each other line is one
  sample (``line n``), rejected alone when it does not parse.
"""

from __future__ import annotations

import re

from fieldgate.formats.common import (
    NUMBER_RE,
    Decoded,
    Sample,
    SampleError,
    epoch_ms,
    integer,
    shown,
)
from fieldgate.formats.options import Options

_INT_RE = re.compile(r"^-?\d+$")
_UINT_RE = re.compile(r"^\d+$")
_TRUE = frozenset(("t", "T", "true", "True", "TRUE"))
_FALSE = frozenset(("f", "F", "false", "False", "FALSE"))


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    d = Decoded()
    prefix = f"{metric}." if metric else ""
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        label = f"line {number}"
        try:
            d.samples.append(_line(line.lstrip(), opts, prefix, d, label))
        except SampleError as exc:
            d.samples.append(Sample([], label=label, error=str(exc)))
    if not d.samples:
        raise SampleError("no line protocol point in the payload")
    return d


def _scan(line: str, pos: int, stops: str, escapable: str) -> tuple[str, int]:
    """Read up to the first unescaped character of ``stops``; returns (text, its index)."""
    out: list[str] = []
    n = len(line)
    while pos < n:
        c = line[pos]
        if c == "\\" and pos + 1 < n and line[pos + 1] in escapable:
            out.append(line[pos + 1])
            pos += 2
            continue
        if c in stops:
            break
        out.append(c)
        pos += 1
    return "".join(out), pos


def _line(line: str, opts: Options, prefix: str, d: Decoded, label: str) -> Sample:
    measurement, pos = _scan(line, 0, ", ", ", ")
    if not measurement:
        raise SampleError("no measurement")
    n = len(line)
    # tag set: skipped over (tags are not part of the metric name), but checked
    while pos < n and line[pos] == ",":
        key, pos = _scan(line, pos + 1, "=, ", ",= ")
        if pos >= n or line[pos] != "=" or not key:
            raise SampleError(f"tag {shown(key)}: expected key=value")
        value, pos = _scan(line, pos + 1, ", ", ",= ")
        if not value:
            raise SampleError(f"tag {shown(key)}: empty value")
    if pos >= n or line[pos] != " ":
        raise SampleError("no field set")
    while pos < n and line[pos] == " ":
        pos += 1
    values: list[tuple[str, float]] = []
    fields = 0
    while True:
        key, pos = _scan(line, pos, "=, ", ",= ")
        if pos >= n or line[pos] != "=" or not key:
            raise SampleError(f"field {shown(key)}: expected key=value")
        pos += 1
        name = f"{prefix}{measurement}.{key}"
        if pos < n and line[pos] == '"':
            raw, pos = _string(line, pos + 1)
            d.skip(name, raw)
        else:
            start = pos
            while pos < n and line[pos] not in ", ":
                pos += 1
            values.append((name, _value(line[start:pos], key)))
        fields += 1
        if pos < n and line[pos] == ",":
            pos += 1
            continue
        break
    ts = None
    rest = line[pos:].strip()
    if rest:
        if not _INT_RE.match(rest):
            raise SampleError(f"timestamp {shown(rest)} is not an integer")
        if opts.payload_time:
            ts = epoch_ms(integer(rest, "timestamp"), opts.influx_precision, "timestamp")
    return Sample(values, ts=ts, label=label)


def _string(line: str, pos: int) -> tuple[str, int]:
    """A string field value after its opening quote; returns (value, index after it)."""
    out: list[str] = []
    n = len(line)
    while pos < n:
        c = line[pos]
        if c == "\\" and pos + 1 < n and line[pos + 1] in '"\\':
            out.append(line[pos + 1])
            pos += 2
            continue
        if c == '"':
            return "".join(out), pos + 1
        out.append(c)
        pos += 1
    raise SampleError("unterminated string field value")


def _value(raw: str, key: str) -> float:
    if not raw:
        raise SampleError(f"field {shown(key)}: no value")
    last = raw[-1]
    if (last == "i" and _INT_RE.match(raw[:-1])) or (last == "u" and _UINT_RE.match(raw[:-1])):
        try:
            return float(integer(raw[:-1], f"field {shown(key)}"))
        except OverflowError:
            raise SampleError(f"field {shown(key)}: {shown(raw)} is out of range") from None
    if raw in _TRUE:
        return 1.0
    if raw in _FALSE:
        return 0.0
    if NUMBER_RE.match(raw):
        return float(raw)
    raise SampleError(f"field {shown(key)}: {shown(raw)} is not a line protocol value")
