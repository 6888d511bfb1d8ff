"""What every device format shares: the decoded result, the value rules, flattening, times.

A decoder turns one payload (text) into :class:`Decoded`: samples, each with its metric values
and, where the payload carries one, its own time; plus how many values were not readings
(skipped and counted: strings, nulls, arrays). It does not look at devices, time bounds or
metric name shapes: :mod:`fieldgate.readings` validates decoded samples the same way for
every format.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: How many skipped value names a reason spells out.
SKIPPED_SHOWN = 5

#: Epoch units and how many of each make a millisecond (as a divisor or a factor).
TS_UNITS: dict[str, tuple[int, int]] = {
    "s": (1, 1000),
    "ms": (1, 1),
    "us": (1000, 1),
    "ns": (1_000_000, 1),
}

#: A decimal number as devices write it in text (no ``_``, ``inf``, ``nan`` or hex: what
#: Python's ``float()`` would also take is deliberately narrower here).
NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")

_isfinite = math.isfinite

#: Strings that are readings: switch states and booleans as devices write them.
BOOLEAN_WORDS = {"on": 1.0, "off": 0.0, "true": 1.0, "false": 0.0}

#: ISO 8601 / RFC 3339 date-time, the zone optional (then it is the input's ``timezone``).
DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?"
    r"\s*([Zz]|[+-]\d{2}:?\d{2})?$"
)


class SampleError(ValueError):
    """One sample (or the whole payload) cannot be read; the text says why."""


@dataclass(slots=True)
class Sample:
    """One sample of a message: its values, its own time if it has one, its device if the
    payload names it (a CSV ``device`` column), and ``label`` for reasons (``line 2``)."""

    values: list[tuple[str, float]]
    ts: int | None = None
    label: str = ""
    device: str | None = None
    #: Why this sample cannot be stored (set instead of values).
    error: str | None = None


@dataclass(slots=True)
class Decoded:
    """What a decoder read from one payload."""

    samples: list[Sample] = field(default_factory=list)
    #: Values that are not readings (strings, nulls, arrays): skipped and counted.
    skipped: int = 0
    #: The first few skipped (name, value) pairs, for the reason of a message that yields no
    #: reading (formatted only then: see :attr:`skipped_shown`).
    skipped_first: list[tuple[str, Any]] = field(default_factory=list)

    def skip(self, name: str, value: Any) -> None:
        self.skipped += 1
        if len(self.skipped_first) < SKIPPED_SHOWN:
            self.skipped_first.append((name, value))

    @property
    def skipped_shown(self) -> list[str]:
        """The first few skipped values as ``name: value`` (JSON)."""
        return [f"{name}: {shown(value)}" for name, value in self.skipped_first]


def shown(value: Any, limit: int = 30) -> str:
    """A value as JSON text, cut for a reason."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def number(value: Any) -> float | None:
    """A JSON value as a reading, or None when it is not one (then it is skipped).

    Numbers (finite), ``true``/``false`` and the strings ON/OFF/true/false (any case) are
    readings; every other string, null and array is not.
    """
    t = type(value)
    if t is float:
        return value if _isfinite(value) else None
    if t is int:
        try:
            return float(value)
        except OverflowError:
            return None
    if t is bool:
        return 1.0 if value else 0.0
    if t is str:
        return BOOLEAN_WORDS.get(value.strip().lower())
    return None


def text_number(text: str) -> float | None:
    """A field of a text payload (CSV, ``value``) as a reading, or None (skipped)."""
    t = text.strip()
    if NUMBER_RE.match(t):
        result = float(t)
        return result if math.isfinite(result) else None
    return BOOLEAN_WORDS.get(t.lower())


def flatten(obj: dict[str, Any], prefix: str, into: Decoded) -> list[tuple[str, float]]:
    """The readings of a JSON object: nested objects joined with ``.``; every value that
    is not a reading is counted in ``into``."""
    pairs: list[Any] = []
    skipped: list[tuple[str, Any]] = []
    flatten_pairs(obj, prefix, pairs, skipped)
    for name, value in skipped:
        into.skip(name, value)
    return list(zip(pairs[0::2], pairs[1::2]))  # noqa: B905 (pairs: even)


def flatten_pairs(obj: dict[str, Any], prefix: str, out: list[Any], skipped: list[Any]) -> None:
    """Add the readings of a JSON object to ``out`` as flat pairs (``name, value, name,
    value, …``: every value a finite float) and every value that is not a reading to
    ``skipped`` as a ``(name, value)`` tuple."""
    for key, value in obj.items():
        name = f"{prefix}{key}" if prefix else key
        t = type(value)
        if t is float:  # the usual values first, as number() takes them
            if _isfinite(value):
                out += (name, value)
                continue
        elif t is int:
            try:
                out += (name, float(value))
                continue
            except OverflowError:
                pass  # number() says it is not a reading
        elif t is dict:
            flatten_pairs(value, f"{name}.", out, skipped)
            continue
        v = number(value)
        if v is None:
            skipped.append((name, value))
        else:
            out += (name, v)


def join(prefix: str | None, name: str) -> str:
    """A metric name under the ``{metric}`` topic level, if the template has one."""
    return f"{prefix}.{name}" if prefix else name


def _reject_constant(token: str) -> float:
    raise SampleError(f"{token} is not allowed in JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: The decoder's C scanner: ``scan_json(text, 0)`` is (the document, where it ends) for text
#: that starts with a JSON value (no leading space); it raises StopIteration, ValueError
#: or RecursionError where :func:`load_json` would say why (the fast paths fall back to it).
scan_json = _DECODER.scan_once


def load_json(text: str) -> Any:
    """A JSON document; SampleError ``bad JSON: …`` (NaN and Infinity are not JSON)."""
    try:  # the usual document, nothing around it: the C scanner alone
        doc, end = scan_json(text, 0)
        if end == len(text):
            return doc
    except (ValueError, StopIteration, RecursionError):
        pass  # read again below, which says what is wrong
    try:
        return _DECODER.decode(text)
    except SampleError as exc:
        raise SampleError(f"bad JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SampleError(f"bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise SampleError("bad JSON: nested too deeply") from None
    except ValueError:  # the only other one: int() past its digit limit
        raise SampleError(f"bad JSON: {TOO_MANY_DIGITS}") from None


#: Python reads integers of at most this many digits (``sys.get_int_max_str_digits``).
TOO_MANY_DIGITS = f"an integer of more than {sys.get_int_max_str_digits()} digits"


def integer(text: str, what: str) -> int:
    """A decimal integer written as text (already matched as one); SampleError past the
    number of digits Python reads."""
    try:
        return int(text)
    except ValueError:
        raise SampleError(f"{what}: {TOO_MANY_DIGITS}") from None


def kind(value: Any) -> str:
    """What a JSON value is, in words."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


# ---- times -------------------------------------------------------------------------------


def zone(name: str) -> dt.tzinfo:
    """The time zone of an input (``UTC`` needs no tz database); ValueError if unknown."""
    if name == "UTC":
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def epoch_ms(value: Any, unit: str, what: str) -> int:
    """An epoch number in ``unit`` (s, ms, us, ns) as integer milliseconds (fractions of a
    millisecond are cut)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SampleError(f"{what}: expected epoch {unit} or a date-time, got {kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SampleError(f"{what}: {value} is not a time")
    div, mul = TS_UNITS[unit]
    if isinstance(value, int):
        return value * mul if div == 1 else value // div
    return math.floor(value * mul / div)


def epoch_text_ms(text: str, unit: str, what: str) -> int:
    """An epoch number written as text (``1767225600``, ``1680962879.62``)."""
    t = text.strip()
    if re.fullmatch(r"[+-]?\d+", t):
        return epoch_ms(integer(t, what), unit, what)
    if NUMBER_RE.match(t):
        return epoch_ms(float(t), unit, what)
    raise SampleError(f"{what}: {shown(text)} is neither epoch {unit} nor a date-time")


_EPOCH = dt.datetime(1970, 1, 1)  # naive on purpose: wall-clock arithmetic
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SECOND = dt.timedelta(seconds=1)
#: UTC offsets (seconds) of a zone per local minute (``YYYY-MM-DDTHH:MM``): zones change
#: their offset on whole minutes, and devices send many times within one.
_OFFSETS: dict[tuple[dt.tzinfo, str], int] = {}


def _offset_secs(tz: dt.tzinfo, local: dt.datetime, minute_key: str) -> int:
    key = (tz, minute_key)
    got = _OFFSETS.get(key)
    if got is None:
        # fold=0: an hour that repeats (daylight saving ends) is read as its first occurrence
        got = int(local.replace(tzinfo=tz, microsecond=0).utcoffset() // _SECOND)  # type: ignore[operator]
        if len(_OFFSETS) >= 4096:
            _OFFSETS.clear()
        _OFFSETS[key] = got
    return got


#: Per zone, UTC epoch ms of second 0 of the local minutes (``YYYY-MM-DD[T ]HH:MM:``) of
#: zone-less times read lately: another time of such a minute is that plus its seconds.
_MINUTES: dict[dt.tzinfo, dict[str, int]] = {}
#: The seconds ``00``-``59`` of such a time (ASCII digits only), in ms.
_SECONDS_MS: dict[str, int] = {f"{s:02d}": s * 1000 for s in range(60)}


def _fast_datetime_ms(t: str, tz: dt.tzinfo) -> int | None:
    """``datetime.fromisoformat`` (C) for texts shaped ``YYYY-MM-DD[T ]HH:MM:SS…``; None
    for anything else (then the regular expression decides). A zone-less
    ``…HH:MM:SS`` of a minute already read (what a device sends, time after time) is its
    minute's time plus the seconds 00-59, exactly what ``fromisoformat`` gives."""
    n = len(t)
    if n == 19:
        minutes = _MINUTES.get(tz)
        if minutes is not None:
            base = minutes.get(t[:17])
            if base is not None:
                secs = _SECONDS_MS.get(t[17:])
                if secs is not None:
                    return base + secs
    if n < 19 or t[4] != "-" or t[10] not in "T " or t[13] != ":" or t[16] != ":":
        return None
    try:
        d = dt.datetime.fromisoformat(t)
    except ValueError:
        return None
    if d.tzinfo is None:
        offset = 0 if tz is dt.UTC else _offset_secs(tz, d, t[:16])
        ms = ((d - _EPOCH) // _SECOND - offset) * 1000 + d.microsecond // 1000
        if n == 19:
            minutes = _MINUTES.setdefault(tz, {})
            if len(minutes) >= 4096:
                minutes.clear()
            minutes[t[:17]] = ms - d.second * 1000
        return ms
    return (d - _EPOCH_UTC) // _SECOND * 1000 + d.microsecond // 1000


def datetime_ms(text: str, tz: dt.tzinfo, what: str) -> int:
    """An ISO 8601 date-time as UTC epoch ms; without a zone it is read in ``tz``."""
    fast = _fast_datetime_ms(text, tz)
    if fast is not None:
        return fast
    return regex_datetime_ms(text, tz, what)


def regex_datetime_ms(text: str, tz: dt.tzinfo, what: str) -> int:
    """:func:`datetime_ms` by the regular expression alone, without the fast path and its
    cache (which give the same for every text they take; the tests compare them)."""
    m = DATETIME_RE.match(text.strip())
    if not m:
        raise SampleError(f"{what}: {shown(text)} is not a date-time (ISO 8601)")
    year, month, day, hour, minute, second, frac, zone_text = m.groups()
    try:
        local = dt.datetime(  # naive: the zone is applied below, as an offset
            int(year), int(month), int(day), int(hour), int(minute), int(second)
        )
    except ValueError as exc:
        raise SampleError(f"{what}: {shown(text)} is not a valid date-time: {exc}") from None
    if zone_text is None:
        offset = 0 if tz is dt.UTC else _offset_secs(tz, local, m.group(0)[:16])
    elif zone_text in ("Z", "z"):
        offset = 0
    else:
        digits = zone_text[1:].replace(":", "")
        offset = (int(digits[:2]) * 3600 + int(digits[2:]) * 60) * (
            1 if zone_text[0] == "+" else -1
        )
    secs = (local - _EPOCH) // _SECOND - offset
    return secs * 1000 + (int(frac[:3].ljust(3, "0")) if frac else 0)


def time_ms(value: Any, unit: str, tz: dt.tzinfo, what: str) -> int:
    """A payload's time: an epoch number in ``unit``, or a date-time text."""
    if isinstance(value, str):
        t = value.strip()
        # a date-time's shape (a ':' at 13) is never a number: the usual text first
        fast = _fast_datetime_ms(t, tz)
        if fast is not None:
            return fast
        if NUMBER_RE.match(t):
            return epoch_text_ms(t, unit, what)
        return datetime_ms(t, tz, what)
    if value is None:
        raise SampleError(f"{what}: missing")
    return epoch_ms(value, unit, what)


def path_get(doc: Any, path: str) -> Any:
    """The value at a dotted path (``data.ts``); KeyError if it is not there."""
    node = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def objects(doc: Any, what: str) -> Iterator[tuple[str, Any]]:
    """The samples of a JSON payload that holds an object or an array of them, each with
    its label (``element i`` in an array, "" for a lone object)."""
    if isinstance(doc, dict):
        yield "", doc
    elif isinstance(doc, list):
        if not doc:
            raise SampleError("empty JSON array: no readings")
        for i, item in enumerate(doc):
            yield f"element {i}", item
    else:
        raise SampleError(f"expected {what}, got {kind(doc)}")


class TimeError(SampleError):
    """The payload's own time cannot be read: the message's one sample is bad (its other
    values are neither read nor counted)."""


#: What a key that is not in a document gives (``dict.pop``).
_ABSENT = object()


def read_object(  # noqa: PLR0917 (formats give the first three with functools.partial)
    what: str,
    ts_key: str,
    ts_unit: str,
    text: str,
    opts: Any,
    metric: str | None,
    out: list[Any],
    skipped: list[Any],
) -> int | None:
    """A payload that is one JSON object (Tasmota, Zigbee2MQTT: their :data:`ObjectReader`
    is this with the first three arguments given), read once for both of the store
    writer's paths: one sample, every key a metric (nested objects flattened), except
    ``ts_key``, which, when present, is the sample's own time (epoch in ``ts_unit`` or a
    date-time; unless the input ignores payload times).

    Adds the readings to ``out`` as flat pairs (``name, value, …``, every value a finite
    float) and the values that are not readings to ``skipped`` (``(name, value)``), and
    returns the sample's own time (UTC epoch ms) or None. SampleError: the payload is not
    one object; :class:`TimeError`: its time cannot be read (then nothing is added).
    :func:`decode_object` turns this into :class:`Decoded` for the long path;
    :func:`fieldgate.inputs.device_rows` turns it into store rows.
    """
    doc = load_json(text)
    if type(doc) is not dict:
        raise SampleError(f"expected a {what} JSON object, got {kind(doc)}")
    ts = None
    raw = doc.pop(ts_key, _ABSENT)  # a fresh document: the time is not a reading
    if raw is not _ABSENT and opts.payload_time:
        if type(raw) is str and len(raw) == 19:  # the usual zone-less time, as time_ms reads it
            ts = _fast_datetime_ms(raw, opts.tz)
        if ts is None:
            try:
                ts = time_ms(raw, ts_unit, opts.tz, ts_key)
            except SampleError as exc:
                raise TimeError(str(exc)) from None
    flatten_pairs(doc, f"{metric}." if metric else "", out, skipped)
    return ts


#: A format's one reader of an object payload: (text, options, metric, pairs out, skipped
#: out) -> the payload's own time or None (:func:`read_object` with the format's keys).
ObjectReader = Callable[[str, Any, "str | None", list[Any], list[Any]], "int | None"]


def decode_object(read: ObjectReader, text: str, opts: Any, metric: str | None) -> Decoded:
    """What a format's :data:`ObjectReader` read, as :class:`Decoded` (the long path)."""
    pairs: list[Any] = []
    skipped: list[tuple[str, Any]] = []
    try:
        ts = read(text, opts, metric, pairs, skipped)
    except TimeError as exc:
        return Decoded([Sample([], error=str(exc))])
    values = list(zip(pairs[0::2], pairs[1::2]))  # noqa: B905 (pairs: even)
    return Decoded([Sample(values, ts)], len(skipped), skipped[:SKIPPED_SHOWN])
