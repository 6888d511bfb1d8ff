"""docs/inputs.md stays true: every documented example (an ``# input`` block, the message
after it, the table of readings and the ``rejected:`` reason, if any) is run through the
format's decoder and the validation, and must give exactly what the page says."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fieldgate.config import parse_config
from fieldgate.formats import FORMAT_NAMES
from fieldgate.inputs import InputTable, read_message
from fieldgate.readings import Rules

DOC = Path(__file__).resolve().parents[2] / "docs" / "inputs.md"
STAMP = 1_780_000_000_123  # stands in for the broker's arrival stamp
NOW = STAMP + 1000

BLOCK_RE = re.compile(r"```(\w+)\n(.*?)```", re.S)


@dataclass
class Example:
    heading: str
    inp: dict[str, Any]
    topic: str
    payload: str
    readings: list[tuple[str, int, str, float]]
    rejected: str | None


def _ts(text: str) -> int:
    if text == "arrival":
        return STAMP
    return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def examples() -> list[Example]:
    text = DOC.read_text(encoding="utf-8")
    found = []
    for m in BLOCK_RE.finditer(text):
        lang, body = m.group(1), m.group(2)
        if lang != "yaml" or not body.startswith("# input\n"):
            continue
        heading = re.findall(r"^### (.+)$", text[: m.start()], re.M)[-1]
        rest = text[m.end() :]
        message = BLOCK_RE.search(rest)
        assert message and message.group(1) == "text", f"{heading}: no message after the input"
        topic, _, payload = message.group(2).partition("\n")
        after = rest[message.end() :]
        table = re.match(
            r"\s*\| device \| ts \| metric \| value \|\n\| --- .*\n((?:\|.*\n)+)", after
        )
        assert table, f"{heading}: no table of readings after the message"
        readings = []
        for row in table.group(1).splitlines():
            device, ts, metric, value = (c.strip() for c in row.strip("|").split("|"))
            readings.append((device, _ts(ts), metric, float(value)))
        rejected = None
        tail = after[table.end() :]
        nxt = BLOCK_RE.search(tail)
        heading_next = re.search(r"^#{2,3} ", tail, re.M)
        if (
            nxt
            and nxt.group(2).startswith("rejected: ")
            and (heading_next is None or nxt.start() < heading_next.start())
        ):
            rejected = nxt.group(2)[len("rejected: ") :].strip()
        found.append(
            Example(heading, yaml.safe_load(body), topic, payload.rstrip("\n"), readings, rejected)
        )
    return found


EXAMPLES = examples()


def test_every_format_has_a_documented_example() -> None:
    assert {e.inp.get("format", "fieldgate") for e in EXAMPLES} == set(FORMAT_NAMES)


@pytest.mark.parametrize("ex", EXAMPLES, ids=[f"{e.heading}:{e.topic}" for e in EXAMPLES])
def test_documented_example_gives_the_documented_readings(ex: Example) -> None:
    cfg = parse_config(
        {
            "site": {"serial": "GW-DOCS"},
            "devices": {"allow_unknown": True},
            "mqtt": {"inputs": [ex.inp]},
        },
        "docs/inputs.md",
    )
    found = InputTable(cfg).match(ex.topic)
    assert found is not None, f"{ex.topic} does not match {ex.inp['topic']}"
    inp, device, metric = found
    assert inp.key == ex.inp["topic"]
    outcome = read_message(
        inp, device, metric, ex.payload.encode(), Rules.from_config(cfg), stamp=STAMP, now_ms=NOW
    )
    assert outcome.readings == ex.readings
    assert outcome.reason == ex.rejected
