"""Payload parsing and validation shared by the collector, the poller and restore.

A message carries one or more *samples*: a JSON object ``{"ts": …, "metrics": {…}}``, each
element of a JSON array of such objects, or each line of a CSV payload (for a device
configured with ``format: csv``). The sample is the unit of acceptance: a sample is stored
whole (all its metrics) or rejected whole. When some samples of a message are bad, the good
ones are stored and the message goes to ``rejected`` once, with a reason naming every bad
sample by its index (``element 3``, ``line 2``); a message with no good sample is rejected
whole. Nothing is ever dropped silently.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fieldgate import store
from fieldgate.config import Config, DeviceConfig, DevicesConfig
from fieldgate.formats.common import Decoded, SampleError, integer, load_json, scan_json
from fieldgate.formats.common import kind as _json_kind
from fieldgate.names import ALLOWED, METRIC_RE, NAME_RE

#: RFC 3339 date-time (a time zone offset is required; ``t``/``z`` and a space allowed).
RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)

#: How much of an oversized payload is kept in ``rejected`` (the reason says it was cut).
REJECTED_PAYLOAD_KEEP = 4096

#: The statement of ``store.insert_readings`` (one reading; the benchmarks' baselines use it).
INSERT_READING_SQL = store.INSERT_READING_SQL

#: At most this many sample reasons are spelled out in one rejection reason.
MAX_REASONS = 5

_isfinite = math.isfinite


@dataclass(slots=True)
class Outcome:
    """What one message yields: readings to store and, if anything was bad, one reason."""

    device: str | None
    readings: list[store.Reading] = field(default_factory=list)
    reason: str | None = None
    samples: int = 0
    bad_samples: int = 0
    #: Values that are not readings (device formats: strings, nulls, arrays), counted.
    skipped: int = 0
    #: Some reading took the message's arrival time (the payload had no time for it).
    stamped: bool = False

    @property
    def wholly_rejected(self) -> bool:
        return self.reason is not None and not self.readings


@dataclass(frozen=True)
class Rules:
    """The validation settings taken from the configuration."""

    devices: DevicesConfig
    max_payload_bytes: int
    topic_prefix: str
    #: Device names already resolved (serial or alias -> serial and configuration).
    known: dict[str, tuple[str, DeviceConfig | None]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_config(cls, cfg: Config) -> Rules:
        return cls(cfg.devices, cfg.mqtt.max_payload_bytes, cfg.mqtt.topic_prefix)

    def resolve(self, name: str) -> tuple[str, DeviceConfig | None]:
        """:func:`resolve_device`, remembered for the names that resolve."""
        got = self.known.get(name)
        if got is None:
            got = resolve_device(self.devices, name)
            if len(self.known) >= 10_000:
                self.known.clear()
            self.known[name] = got
        return got


def device_from_topic(topic: str, prefix: str) -> str | None:
    """The device level of ``<prefix>/<device>/readings``, or None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != prefix or parts[2] != "readings":
        return None
    return parts[1]


def resolve_device(devices: DevicesConfig, name: str) -> tuple[str, DeviceConfig | None]:
    """The canonical serial (and its configuration) of a device named by serial or alias.

    Raises SampleError for an unknown device (unless ``allow_unknown``) or an unusable name.
    """
    if not name:
        raise SampleError("the topic names no device")
    serial = devices.resolve(name)
    if serial is not None:
        return serial, devices.get(serial)
    if not devices.allow_unknown:
        raise SampleError(
            f"unknown device {_quoted(name)}: not in devices.list (devices.allow_unknown is false)"
        )
    if not NAME_RE.fullmatch(name):
        raise SampleError(f"device name {_quoted(name)} is not valid ({ALLOWED['name']})")
    return name, None


def _quoted(name: str, limit: int = 60) -> str:
    """``repr(name)``, cut for a reason (a topic level can be 65535 characters long)."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_ts(value: Any, devices: DevicesConfig, now_ms: int) -> int:
    """A sample's ``ts`` (epoch ms integer or RFC 3339 string) as UTC epoch milliseconds."""
    if isinstance(value, bool):
        raise SampleError(f"ts: expected epoch milliseconds or an RFC 3339 string, got {value}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise SampleError(f"ts: epoch milliseconds must be an integer, got {value!r}")
        value = int(value)
    if isinstance(value, int):
        ts = value
    elif isinstance(value, str):
        ts = _parse_rfc3339(value)
    elif value is None:
        raise SampleError("ts: missing")
    else:
        raise SampleError(
            f"ts: expected epoch milliseconds or an RFC 3339 string, got {type(value).__name__}"
        )
    lo = devices.min_ts_secs * 1000
    hi = now_ms + devices.max_future_secs * 1000
    if ts < lo:
        hint = " (seconds instead of milliseconds?)" if 0 < ts * 1000 <= hi else ""
        raise SampleError(
            f"ts: {_int_text(ts)} ({_iso(ts)}) is before devices.min_ts_secs ({_iso(lo)}){hint}"
        )
    if ts > hi:
        raise SampleError(
            f"ts: {_int_text(ts)} ({_iso(ts)}) is more than devices.max_future_secs "
            f"({devices.max_future_secs} s) in the future"
        )
    return ts


def _int_text(n: int) -> str:
    """An integer for a reason: Python cannot print one of more than 4300 digits (a CSV time
    of 4300 digits in seconds becomes one in milliseconds)."""
    if n.bit_length() < 10_000:
        return str(n)
    return f"an integer of about {int(n.bit_length() * 0.30103)} digits"


def _iso(ms: int) -> str:
    try:
        return store.iso_utc(ms)
    except (OverflowError, OSError, ValueError):
        return "out of range"


def _parse_rfc3339(text: str) -> int:
    m = RFC3339_RE.match(text.strip())
    if not m:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise SampleError(f"ts: {shown!r} is not an RFC 3339 date-time with a time zone")
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        offset = dt.timedelta(0)
        if zone not in ("Z", "z"):
            sign = 1 if zone[0] == "+" else -1
            offset = sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
        when = dt.datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            tzinfo=dt.timezone(offset),
        )
    except ValueError as exc:
        raise SampleError(f"ts: {text!r} is not a valid date-time: {exc}") from None
    millis = int((frac or "0")[:3].ljust(3, "0"))
    return int(when.timestamp()) * 1000 + millis


def parse_value(name: str, value: Any) -> float:
    """A metric value: a finite JSON number (not a boolean, not a string)."""
    if isinstance(value, bool):
        raise SampleError(f"metrics.{name}: {str(value).lower()} is not a number")
    if isinstance(value, int):
        try:
            result = float(value)
        except OverflowError:
            raise SampleError(f"metrics.{name}: {value} is out of range") from None
    elif isinstance(value, float):
        result = value
    elif value is None:
        raise SampleError(f"metrics.{name}: missing value (null)")
    else:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 30 else shown[:27] + "..."
        raise SampleError(f"metrics.{name}: {shown} is not a number")
    if not math.isfinite(result):
        raise SampleError(f"metrics.{name}: {value} is not a finite number")
    return result


#: Metric names already found valid (a site has few; checking each once is enough).
_GOOD_METRICS: set[str] = set()


def check_metric_name(name: Any) -> str:
    """A valid metric name, or SampleError."""
    if name in _GOOD_METRICS:
        return name
    if not isinstance(name, str) or not METRIC_RE.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:37] + "..."
        raise SampleError(f"metric name {shown} is not valid ({ALLOWED['metric']})")
    if len(_GOOD_METRICS) < 10_000:
        _GOOD_METRICS.add(name)
    return name


def parse_sample(obj: Any, device: str, devices: DevicesConfig, now_ms: int) -> list[store.Reading]:
    """One ``{"ts": …, "metrics": {…}}`` object as readings (other keys are ignored)."""
    if not isinstance(obj, dict):
        raise SampleError(f"expected an object with ts and metrics, got {_json_kind(obj)}")
    if "ts" not in obj:
        raise SampleError("ts: missing")
    ts = obj["ts"]
    ts = check_ts(ts, devices, now_ms) if type(ts) is int else parse_ts(ts, devices, now_ms)
    if "metrics" not in obj:
        raise SampleError("metrics: missing")
    metrics = obj["metrics"]
    if not isinstance(metrics, dict):
        raise SampleError(f"metrics: expected an object of name: number, got {_json_kind(metrics)}")
    if not metrics:
        raise SampleError("metrics: empty")
    good = _GOOD_METRICS
    readings = []
    for name, raw in metrics.items():
        # the usual case (a known name, a finite float) without the calls that say why not
        if name not in good:
            check_metric_name(name)
        value = raw if type(raw) is float and _isfinite(raw) else parse_value(name, raw)
        readings.append((device, ts, name, value))
    return readings


def parse_json_samples(doc: Any) -> list[Any]:
    """The samples of a JSON payload (its loaded document): the object itself, or the
    elements of an array."""
    if isinstance(doc, list):
        if not doc:
            raise SampleError("empty JSON array: no readings")
        return doc
    if isinstance(doc, dict):
        return [doc]
    raise SampleError(f"expected a JSON object or array, got {_json_kind(doc)}")


def parse_csv_lines(text: str, columns: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each data line; blank lines and a header line are skipped."""
    result = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if fields == columns:
            continue
        result.append((number, fields))
    if not result:
        raise SampleError("empty CSV payload: no data line")
    return result


def parse_csv_sample(
    fields_: list[str], columns: list[str], device: str, devices: DevicesConfig, now_ms: int
) -> list[store.Reading]:
    """One CSV line (its columns as configured in ``csv_columns``) as readings."""
    if len(fields_) != len(columns):
        raise SampleError(f"{len(fields_)} fields, expected {len(columns)} ({','.join(columns)})")
    row = dict(zip(columns, fields_, strict=True))
    ts_text = row.pop("ts")
    ts_value: Any = integer(ts_text, "ts") if re.fullmatch(r"-?\d+", ts_text) else ts_text
    if ts_text == "":
        ts_value = None
    ts = parse_ts(ts_value, devices, now_ms)
    readings = []
    for name, text in row.items():
        if text == "":
            raise SampleError(f"metrics.{name}: missing value (empty field)")
        try:
            value = float(text)
        except ValueError:
            shown = text if len(text) <= 30 else text[:27] + "..."
            raise SampleError(f"metrics.{name}: {shown!r} is not a number") from None
        if not math.isfinite(value):
            raise SampleError(f"metrics.{name}: {text} is not a finite number")
        readings.append((device, ts, check_metric_name(name), value))
    return readings


def check_ts(ts: int, devices: DevicesConfig, now_ms: int) -> int:
    """A time (UTC epoch ms) within ``devices.min_ts_secs`` and ``devices.max_future_secs``."""
    lo = devices.min_ts_secs * 1000
    hi = now_ms + devices.max_future_secs * 1000
    if lo <= ts <= hi:
        return ts
    return parse_ts(ts, devices, now_ms)  # raises with the reason


def decoded_outcome(
    decoded: Decoded,
    device_name: str | None,
    devices: DevicesConfig,
    *,
    stamp: int,
    now_ms: int,
    keep: Callable[[str], bool] | None = None,
    resolve: Callable[[str], tuple[str, DeviceConfig | None]] | None = None,
) -> Outcome:
    """Validate what a device format decoded (docs/inputs.md): the same rules as the native
    format, per reading.

    ``device_name`` is the topic's ``{device}`` (or the input's ``device``); a sample's own
    ``device`` (a CSV column) must name the same device when both are given. A sample
    without its own time takes ``stamp``, the broker's arrival stamp. ``keep`` is the
    input's include/exclude filter; ``resolve`` resolves ``device_name`` as
    :func:`resolve_device` does (:meth:`Rules.resolve`, which remembers). A sample that
    cannot be stored, a bad metric name, a value that is not finite or a second value for
    the same key in one message is a problem: the rest is stored and the message also goes
    to ``rejected`` with the reasons. A message that yields no reading is rejected with the
    reason.
    """
    serial: str | None = None
    if device_name is not None:
        try:
            if resolve is None:
                serial, _ = resolve_device(devices, device_name)
            else:
                serial, _ = resolve(device_name)
        except SampleError as exc:
            return Outcome(device=None, reason=str(exc), skipped=decoded.skipped)
    outcome = Outcome(device=serial, skipped=decoded.skipped)
    problems: list[str] = []
    bad_samples = 0
    excluded = 0
    readings = outcome.readings
    good_names = _GOOD_METRICS
    finite = math.isfinite
    #: (device, ts, metric) -> (value, where) of this message's readings so far
    seen: dict[tuple[str, int, str], tuple[float, str]] = {}
    for sample in decoded.samples:
        where = f"{sample.label}: " if sample.label else ""
        if sample.error is not None:
            problems.append(f"{where}{sample.error}")
            bad_samples += 1
            continue
        try:
            device = (
                serial
                if sample.device is None and serial is not None
                else _sample_device(sample.device, serial, device_name, devices)
            )
            if sample.ts is None:
                ts = stamp
                outcome.stamped = True
            else:
                ts = check_ts(sample.ts, devices, now_ms)
        except SampleError as exc:
            problems.append(f"{where}{exc}")
            bad_samples += 1
            continue
        outcome.device = device
        for name, value in sample.values:
            if keep is not None and not keep(name):
                excluded += 1
                continue
            if name not in good_names:
                try:
                    check_metric_name(name)
                except SampleError as exc:
                    problems.append(f"{where}{exc}")
                    continue
            if not finite(value):
                problems.append(f"{where}{name}: {value} is not a finite number")
                continue
            key = (device, ts, name)
            first = seen.get(key)
            if first is None:
                seen[key] = (value, where)
                readings.append((device, ts, name, value))
            elif first[0] != value:
                again = f" (also in {first[1].rstrip(': ')})" if first[1] else ""
                shared = ", the message's arrival time" if sample.ts is None else ""
                problems.append(f"{where}{name}: a second value for the same time{shared}{again}")
    outcome.samples = len(decoded.samples)
    outcome.bad_samples = bad_samples
    if problems:
        outcome.reason = _summarise_decoded(problems, bad_samples, outcome)
    elif not outcome.readings:
        outcome.reason = _no_reading(decoded, excluded)
    return outcome


def _sample_device(
    named: str | None, serial: str | None, topic_name: str | None, devices: DevicesConfig
) -> str:
    """The serial of a sample's device: the topic's, or its own (a CSV ``device`` column),
    which must then agree with the topic's."""
    if named is None:
        if serial is None:
            raise SampleError("no device: the topic names none and the sample neither")
        return serial
    if not named:
        raise SampleError("device: empty field")
    own, _ = resolve_device(devices, named)
    if serial is not None and own != serial:
        raise SampleError(f"device {named!r} is not the topic's device {topic_name!r}")
    return own


def _summarise_decoded(problems: list[str], bad_samples: int, outcome: Outcome) -> str:
    shown = "; ".join(problems[:MAX_REASONS])
    more = f"; and {len(problems) - MAX_REASONS} more" if len(problems) > MAX_REASONS else ""
    if outcome.samples > 1 and bad_samples == len(problems):
        return _summarise(problems, outcome.samples)
    if outcome.readings:
        return f"{len(outcome.readings)} readings stored, rejected: {shown}{more}"
    return f"{shown}{more}"


def _no_reading(decoded: Decoded, excluded: int) -> str:
    parts = []
    if decoded.skipped:
        what = ", ".join(decoded.skipped_shown)
        more = ", ..." if decoded.skipped > len(decoded.skipped_shown) else ""
        parts.append(f"{decoded.skipped} values are not numbers ({what}{more})")
    if excluded:
        parts.append(f"{excluded} left out by include/exclude")
    if not decoded.samples and not parts:
        parts.append("the payload holds no values")
    return "no reading: " + "; ".join(parts) if parts else "no reading: no values"


def decode_payload(payload: bytes, max_bytes: int) -> str:
    """A payload's text: at most ``max_bytes``, valid UTF-8; SampleError says which not."""
    if len(payload) > max_bytes:
        raise SampleError(
            f"payload of {len(payload)} bytes is over mqtt.max_payload_bytes "
            f"({max_bytes}); first {REJECTED_PAYLOAD_KEEP} bytes kept"
        )
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(f"payload is not valid UTF-8 (byte {exc.start})") from None


def split_samples(text: str, csv_columns: list[str] | None) -> list[tuple[str, Any]]:
    """A payload's samples, each with the label its reason gets: ``line n`` (CSV, for a
    device with ``csv_columns``), ``element i`` (a JSON array), "" (a lone JSON object)."""
    if csv_columns is not None:
        return [(f"line {n}", f) for n, f in parse_csv_lines(text, csv_columns)]
    doc = load_json(text)
    if type(doc) is dict:
        return [("", doc)]
    return [(f"element {i}", d) for i, d in enumerate(parse_json_samples(doc))]


def parse_payload(
    device_name: str,
    payload: bytes,
    rules: Rules,
    *,
    now_ms: int | None = None,
) -> Outcome:
    """Validate one message from ``device_name`` and turn it into readings and/or a reason."""
    now_ms = store.now_ms() if now_ms is None else now_ms
    try:
        device, dev_cfg = rules.resolve(device_name)
    except SampleError as exc:
        return Outcome(device=None, reason=str(exc))
    outcome = Outcome(device=device)
    csv_columns = dev_cfg.csv_columns if dev_cfg is not None and dev_cfg.format == "csv" else None
    try:
        samples = split_samples(decode_payload(payload, rules.max_payload_bytes), csv_columns)
    except SampleError as exc:
        outcome.reason = str(exc)
        return outcome
    problems: list[str] = []
    for label, sample in samples:
        try:
            if csv_columns is not None:
                got = parse_csv_sample(sample, csv_columns, device, rules.devices, now_ms)
            else:
                got = parse_sample(sample, device, rules.devices, now_ms)
        except SampleError as exc:
            problems.append(f"{label}: {exc}" if label else str(exc))
            continue
        outcome.readings.extend(got)
    outcome.samples = len(samples)
    outcome.bad_samples = len(problems)
    if problems:
        outcome.reason = _summarise(problems, len(samples))
    return outcome


def native_rows(
    payload: bytes, serial: str, at: int, rules: Rules, *, source: str, into: list[object]
) -> bool:
    """The usual native payload's readings, added to ``into`` as
    :func:`store.insert_reading_rows` takes them (six values per reading); False, with
    ``into`` unchanged, for any other payload.

    The usual payload: one JSON object (nothing around it) whose ``ts`` is an integer within
    the time bounds and whose ``metrics`` is a non-empty object of metric names already
    found valid and finite numbers. For such a payload of device ``serial`` (resolved from
    the topic; not a CSV device) received at ``at``, :func:`parse_payload` gives exactly
    these readings and no reason; every other payload goes through :func:`parse_payload`,
    which says what is wrong. The cheap path skips the calls that spell out reasons.
    """
    if len(payload) > rules.max_payload_bytes:
        return False
    try:
        text = payload.decode()
        doc, end = scan_json(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return False
    if end != len(text) or type(doc) is not dict:
        return False
    ts = doc.get("ts")
    metrics = doc.get("metrics")
    devices = rules.devices
    if (
        type(ts) is not int
        or type(metrics) is not dict
        or not metrics
        or not devices.min_ts_secs * 1000 <= ts <= at + devices.max_future_secs * 1000
    ):
        return False
    good = _GOOD_METRICS
    rows: list[object] = []
    for name, raw in metrics.items():
        if name not in good:
            return False
        kind = type(raw)
        if kind is float:
            if not _isfinite(raw):
                return False
            value = raw
        elif kind is int:
            try:
                value = float(raw)
            except OverflowError:
                return False
        else:
            return False
        rows += (serial, ts, name, value, at, source)
    into += rows
    return True


def decoded_rows(
    decoded: Decoded,
    serial: str,
    rules: Rules,
    *,
    stamp: int,
    at: int,
    keep: Callable[[str], bool] | None,
    source: str,
    into: list[object],
) -> bool:
    """The readings of a device format's usual decoded payload, added to ``into`` as
    :func:`store.insert_reading_rows` takes them (six values per reading); False, with
    ``into`` unchanged, for any other.

    The usual decoded payload: no sample with an error or naming a device other than the
    topic's, every sample's own time within the time bounds, every value kept by ``keep``
    a metric name already found valid and a finite number, no key (time, name) twice, at
    least one reading. For it, of device ``serial`` (resolved from the topic) received at ``at``
    with the broker's arrival stamp ``stamp``, :func:`decoded_outcome` gives exactly these
    readings and no reason; every other one goes through :func:`decoded_outcome`, which
    says what is wrong. Values that are not readings (``decoded.skipped``) are the
    caller's to count.
    """
    devices = rules.devices
    lo = devices.min_ts_secs * 1000
    hi = at + devices.max_future_secs * 1000
    good = _GOOD_METRICS
    finite = _isfinite
    samples = decoded.samples
    one = len(samples) == 1
    seen: set[object] = set()
    rows: list[object] = []
    for sample in samples:
        if sample.error is not None:
            return False
        named = sample.device
        if named is not None:  # a CSV device column: the topic's device, else the long way
            try:
                if not named or rules.resolve(named)[0] != serial:
                    return False
            except SampleError:
                return False
        ts = sample.ts
        if ts is None:
            ts = stamp
        elif not lo <= ts <= hi:
            return False
        for name, value in sample.values:
            if keep is not None and not keep(name):
                continue
            if name not in good or not finite(value):
                return False
            key = name if one else (ts, name)
            if key in seen:
                return False
            seen.add(key)
            rows += (serial, ts, name, value, at, source)
    if not rows:
        return False
    into += rows
    return True


def pair_rows(
    pairs: list[Any],
    ts: int | None,
    serial: str,
    rules: Rules,
    *,
    stamp: int,
    at: int,
    keep: Callable[[str], bool] | None,
    source: str,
    into: list[object],
) -> bool:
    """The readings of a one-sample payload read as flat pairs (``name, value, …``, every
    value a finite float: an object format's :data:`~fieldgate.formats.ObjectReader`), with
    its own time ``ts`` or None, added to ``into`` as :func:`store.insert_reading_rows`
    takes them; False, with ``into`` unchanged, for any other.

    The rules of :func:`decoded_rows` for that one sample: its time within the bounds,
    every name kept by ``keep`` already found valid, no name twice, at least one reading.
    The rows are built by list operations, with no tuple per reading.
    """
    if keep is not None:
        kept: list[Any] = []
        for i in range(0, len(pairs), 2):
            if keep(pairs[i]):
                kept += pairs[i : i + 2]
        pairs = kept
    names = pairs[0::2]
    k = len(names)
    if not k or not _GOOD_METRICS.issuperset(names) or (k > 1 and len(set(names)) != k):
        return False
    if ts is None:
        ts = stamp
    else:
        devices = rules.devices
        if not devices.min_ts_secs * 1000 <= ts <= at + devices.max_future_secs * 1000:
            return False
    rows: list[object] = [serial, ts, None, None, at, source] * k
    rows[2::6] = names
    rows[3::6] = pairs[1::2]
    into += rows
    return True


def _summarise(problems: list[str], total: int) -> str:
    if total == 1:
        return problems[0]
    shown = "; ".join(problems[:MAX_REASONS])
    more = f"; and {len(problems) - MAX_REASONS} more" if len(problems) > MAX_REASONS else ""
    kept = total - len(problems)
    tail = f", the other {kept} stored" if kept else ""
    return f"{len(problems)} of {total} samples rejected{tail}: {shown}{more}"


def parse_message(
    topic: str, payload: bytes, rules: Rules, *, now_ms: int | None = None
) -> Outcome:
    """Validate one MQTT message by its topic ``<prefix>/<device>/readings`` and payload."""
    device_name = device_from_topic(topic, rules.topic_prefix)
    if device_name is None:
        return Outcome(
            device=None,
            reason=f"topic {topic!r} is not {rules.topic_prefix}/<device>/readings",
        )
    return parse_payload(device_name, payload, rules, now_ms=now_ms)


def rejected_payload(payload: bytes) -> bytes | str:
    """What ``rejected.payload`` keeps: the text when it is UTF-8, else the bytes; cut if huge."""
    if len(payload) > REJECTED_PAYLOAD_KEEP:
        payload = payload[:REJECTED_PAYLOAD_KEEP]
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload


@dataclass(slots=True)
class Received:
    """One message as it reached a collector or poller."""

    topic: str
    payload: bytes
    received_at: int
    outcome: Outcome
    #: The input the message came through (its topic template), for per-input counts.
    input: str = ""


def reading_rows(items: Iterable[Received], source: str, into: list[object]) -> None:
    """Add the readings of messages to ``into`` as :func:`store.insert_reading_rows` takes
    them (six values per reading), in order."""
    for item in items:
        at = item.received_at
        for d, ts, m, v in item.outcome.readings:
            into += (d, ts, m, v, at, source)


def store_rejections(conn: sqlite3.Connection, items: Iterable[Received], source: str) -> None:
    """Keep every message of ``items`` that has a reason in ``rejected``, with the reason."""
    for item in items:
        if item.outcome.reason is not None:
            store.insert_rejected(
                conn,
                source=source,
                topic=item.topic,
                payload=rejected_payload(item.payload),
                reason=item.outcome.reason,
                received_at=item.received_at,
            )


def store_outcomes(
    conn: sqlite3.Connection,
    items: Iterable[Received],
    *,
    source: str,
    new_by_input: dict[str, int] | None = None,
) -> int:
    """Insert the readings and rejections of many messages (call inside one transaction).

    Returns how many readings were new; with ``new_by_input``, also adds each input's new
    readings there (the readings of each input of the batch are inserted together).
    """
    items = list(items)
    groups: dict[str, list[Received]] = {}
    for item in items:
        groups.setdefault(item.input, []).append(item)
    new = 0
    for key, group in groups.items():
        flat: list[object] = []
        reading_rows(group, source, flat)
        got = store.insert_reading_rows(conn, flat)
        if new_by_input is not None:
            new_by_input[key] = new_by_input.get(key, 0) + got
        new += got
    store_rejections(conn, items, source)
    return new
