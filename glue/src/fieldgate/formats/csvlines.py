"""``csv``: delimited lines whose columns the input names (``csv.columns``).

Each line is a sample (``line n``). Columns are ``ts`` (the line's time: epoch in
``csv.ts_unit`` or an ISO 8601 date-time), ``device`` (the line's device, serial or alias),
``-`` (not read) or a metric name. Fields are split by Python's ``csv`` module with the
input's delimiter and RFC 4180 quoting (``"a;b"`` is one field, ``""`` inside quotes is a
quote, a quoted field may span lines). A payload may hold several lines; blank lines are
skipped, and with ``csv.header: true`` so is its first line. A line with fewer fields than
columns is rejected; fields beyond the columns are not read (an ISEMS node's log line has
19 fields, and an input may name only the first few). A metric field that is not a number
(or ON/OFF, true/false) is skipped and counted.
"""

from __future__ import annotations

import csv
import io

from fieldgate.formats.common import (
    NUMBER_RE,
    Decoded,
    Sample,
    SampleError,
    datetime_ms,
    epoch_text_ms,
    text_number,
)
from fieldgate.formats.options import Options


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    spec = opts.csv
    prefix = f"{metric}." if metric else ""
    d = Decoded()
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=spec.delimiter, strict=True)
    first = True
    line = 1
    try:
        for row in reader:
            label = f"line {line}"
            line = reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if first and spec.header:
                first = False
                continue
            first = False
            d.samples.append(_row(row, opts, prefix, d, label))
    except csv.Error as exc:
        d.samples.append(Sample([], label=f"line {line}", error=f"bad CSV: {exc}"))
    if not d.samples:
        raise SampleError("empty CSV payload: no data line")
    return d


def _row(row: list[str], opts: Options, prefix: str, d: Decoded, label: str) -> Sample:
    spec = opts.csv
    columns = spec.columns
    if len(row) < len(columns):
        wanted = f"{len(columns)} ({spec.delimiter.join(columns)})"
        return Sample([], label=label, error=f"{len(row)} fields, expected {wanted}")
    sample = Sample([], label=label)
    for role, field in zip(columns, row, strict=False):
        if role == "-":
            continue
        if role == "ts":
            if not opts.payload_time:
                continue
            text = field.strip()
            try:
                if not text:
                    raise SampleError("ts: empty field")
                sample.ts = (
                    epoch_text_ms(text, spec.ts_unit, "ts")
                    if NUMBER_RE.match(text)
                    else datetime_ms(text, opts.tz, "ts")
                )
            except SampleError as exc:
                return Sample([], label=label, error=str(exc))
        elif role == "device":
            sample.device = field.strip()
        else:
            value = text_number(field)
            name = f"{prefix}{role}"
            if value is None:
                d.skip(name, field)
            else:
                sample.values.append((name, value))
    return sample
