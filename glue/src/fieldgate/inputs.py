"""The collector's inputs: which topics it subscribes to and how each message is read.

The native topic ``<prefix>/{device}/readings`` (docs/contract.md §4) and every
``mqtt.inputs`` entry (docs/inputs.md) become an :class:`Input`: a parsed template, its
format's decoder with prepared options, and its include/exclude filter, all built once.
:class:`InputTable` finds a received topic's input: a dict of topics already seen (devices
publish on the same few topics over and over), else the inputs whose first level is that
topic's (a dict), else the few whose first level is a wildcard. Inputs never overlap (the
configuration refuses it), so the first match is the only one.

:func:`read_message` turns one message into an :class:`~fieldgate.readings.Outcome` with
the same validation as the native format; the poller reads node bodies the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any

from fieldgate.config import Config, FormatOptions
from fieldgate.formats import (
    DECODERS,
    NATIVE,
    OBJECT_READERS,
    Decoder,
    ObjectReader,
    Options,
    SampleError,
    options_from,
)
from fieldgate.readings import (
    Outcome,
    Rules,
    decode_payload,
    decoded_outcome,
    decoded_rows,
    pair_rows,
    parse_payload,
)
from fieldgate.topics import Template, parse_template

#: A topic seen this often is matched from the cache; the cache is emptied when full.
TOPIC_CACHE_MAX = 10_000
#: The store's ``state`` key prefix of each input's counters.
STATE_PREFIX = "collector.input."


def metric_filter(include: list[str], exclude: list[str]) -> Callable[[str], bool] | None:
    """The include/exclude globs as one predicate on a metric name (None: keep all)."""
    if not include and not exclude:
        return None
    inc = re.compile("|".join(translate(g) for g in include)) if include else None
    exc = re.compile("|".join(translate(g) for g in exclude)) if exclude else None

    def keep(name: str) -> bool:
        if inc is not None and inc.match(name) is None:
            return False
        return exc is None or exc.match(name) is None

    return keep


@dataclass(frozen=True)
class Input:
    """One subscription and how its payloads are read."""

    #: The topic template as configured: names the input in logs and ``status``.
    key: str
    format: str
    template: Template
    #: None for the native format (parsed by fieldgate.readings.parse_payload).
    decoder: Decoder | None
    options: Options
    #: The device of a topic that names none (``mqtt.inputs[].device``, a poll node's).
    device: str | None = None
    keep: Callable[[str], bool] | None = None
    #: The one reader ``decoder`` wraps, for a format whose payload is one object.
    read: ObjectReader | None = None

    @classmethod
    def of(cls, key: str, template: Template, o: FormatOptions, device: str | None) -> Input:
        return cls(
            key=key,
            format=o.format,
            template=template,
            decoder=DECODERS.get(o.format),
            options=options_from(o),
            device=device,
            keep=metric_filter(o.include, o.exclude),
            read=OBJECT_READERS.get(o.format),
        )


def native_input(cfg: Config) -> Input:
    t = parse_template(cfg.mqtt.native_topic)
    return Input(key=t.text, format=NATIVE, template=t, decoder=None, options=Options())


def poll_input(node: Any) -> Input:
    """How a poll node's body is read (its device is the node's ``device``)."""
    t = parse_template(f"poll/{node.name}")
    return Input.of(f"poll:{node.name}", t, node, node.device)


Match = tuple[Input, str | None, str | None]
"""An input with the topic's ``{device}`` and ``{metric}`` levels (None where it has none)."""


class InputTable:
    """Every input of the collector, and the matching of received topics to them."""

    def __init__(self, cfg: Config) -> None:
        self.inputs: list[Input] = [native_input(cfg)]
        for inp in cfg.mqtt.inputs:
            self.inputs.append(Input.of(inp.topic, inp.template, inp, inp.device))
        self._by_first: dict[str, list[Input]] = {}
        self._wild_first: list[Input] = []
        for inp in self.inputs:
            first = inp.template.literals[0] if inp.template.literals else None
            if first is not None and first[0] == 0:
                self._by_first.setdefault(first[1], []).append(inp)
            else:
                self._wild_first.append(inp)
        self._cache: dict[str, Match | None] = {}

    @property
    def filters(self) -> list[str]:
        """The MQTT subscriptions, one per input."""
        return [inp.template.filter for inp in self.inputs]

    def match(self, topic: str) -> Match | None:
        """The input of a received topic and its captured levels, or None."""
        try:
            return self._cache[topic]
        except KeyError:
            pass
        parts = topic.split("/")
        found: Match | None = None
        for inp in (*self._by_first.get(parts[0], ()), *self._wild_first):
            t = inp.template
            if t.match(parts):
                device = parts[t.device_at] if t.device_at is not None else inp.device
                metric = parts[t.metric_at] if t.metric_at is not None else None
                found = (inp, device, metric)
                break
        if len(self._cache) >= TOPIC_CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = found
        return found


def read_message(
    inp: Input,
    device: str | None,
    metric: str | None,
    payload: bytes,
    rules: Rules,
    *,
    stamp: int,
    now_ms: int,
) -> Outcome:
    """Validate one message of an input: its readings and/or the reason it is rejected.

    ``stamp`` is the time of readings the payload gives no time for (the broker's arrival
    stamp, or what stands in for it).
    """
    if inp.decoder is None:
        return parse_payload(device or "", payload, rules, now_ms=now_ms)
    try:
        text = decode_payload(payload, rules.max_payload_bytes)
        decoded = inp.decoder(text, inp.options, metric)
    except SampleError as exc:
        return Outcome(device=None, reason=str(exc))
    return decoded_outcome(
        decoded,
        device,
        rules.devices,
        stamp=stamp,
        now_ms=now_ms,
        keep=inp.keep,
        resolve=rules.resolve,
    )


def device_rows(
    inp: Input,
    serial: str,
    metric: str | None,
    payload: bytes,
    rules: Rules,
    *,
    stamp: int,
    at: int,
    source: str,
    into: list[object],
) -> int | None:
    """The store writer's cheap path for a device format's usual message: its readings
    added to ``into`` and the number of values that were not readings; None, with ``into``
    unchanged, for any other message.

    The payload is read by the input's one decoder, as :func:`read_message` reads it, for a
    device ``serial`` already resolved from the topic and the broker's arrival ``stamp``;
    only the validation that spells out reasons is left out. A format whose payload is one
    object is read by the reader its decoder wraps (``inp.read``) straight into rows
    (:func:`fieldgate.readings.pair_rows`), any other by its decoder
    (:func:`fieldgate.readings.decoded_rows`). A message it declines (too large, not UTF-8,
    not the format, anything those decline, even an unexpected error) is read again by
    :func:`read_message`, which says why.
    """
    if len(payload) > rules.max_payload_bytes or inp.decoder is None:
        return None
    try:
        read = inp.read
        if read is not None:
            pairs: list[object] = []
            skipped: list[object] = []
            ts = read(payload.decode(), inp.options, metric, pairs, skipped)
            took = pair_rows(
                pairs,
                ts,
                serial,
                rules,
                stamp=stamp,
                at=at,
                keep=inp.keep,
                source=source,
                into=into,
            )
            return len(skipped) if took else None
        decoded = inp.decoder(payload.decode(), inp.options, metric)
        took = decoded_rows(
            decoded, serial, rules, stamp=stamp, at=at, keep=inp.keep, source=source, into=into
        )
    except Exception:  # read_message reads it again and gives the reason
        return None
    return decoded.skipped if took else None


@dataclass
class InputCounts:
    """What ``status`` shows per input, since the counters were created."""

    messages: int = 0
    readings: int = 0
    skipped: int = 0
    rejected: int = 0
    #: Messages that needed the broker's arrival stamp and came without it.
    unstamped: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> InputCounts:
        try:
            data = json.loads(text)
        except ValueError:
            return cls()
        names = cls.__dataclass_fields__
        return cls(**{k: int(v) for k, v in data.items() if k in names and isinstance(v, int)})


@dataclass
class Counters:
    """Per-input counters, kept in the store's ``state`` table (key ``collector.input.<topic
    template>``) and written in the transaction of the batch they count."""

    by_input: dict[str, InputCounts] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)

    @classmethod
    def from_state(cls, state: dict[str, tuple[str, int]]) -> Counters:
        c = cls()
        for key, (value, _at) in state.items():
            if key.startswith(STATE_PREFIX):
                c.by_input[key[len(STATE_PREFIX) :]] = InputCounts.from_json(value)
        return c

    def get(self, key: str) -> InputCounts:
        self.touched.add(key)
        got = self.by_input.get(key)
        if got is None:
            got = self.by_input[key] = InputCounts()
        return got

    def changed(self) -> list[tuple[str, str]]:
        """(state key, value) of every input counted since the last call."""
        out = [(STATE_PREFIX + k, self.by_input[k].to_json()) for k in sorted(self.touched)]
        self.touched.clear()
        return out
