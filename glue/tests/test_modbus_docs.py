"""docs/modbus.md stays true: its SDM630 example, polled against pymodbus's RTU server at the
far end of a socat pty pair serving the values of its readings table, stores that table."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import yaml
from modbus_sim import Memory, pty_pair, simulator, words
from support import ConfigFactory, run_fieldgate

DOC = Path(__file__).resolve().parents[2] / "docs" / "modbus.md"


def block_after(marker: str) -> str:
    """The fenced block that follows ``marker`` in the page."""
    text = DOC.read_text()
    start = text.index(marker)
    m = re.compile(r"```[a-z]*\n(.*?)```", re.S).search(text, start)
    assert m, f"no code block after {marker}"
    return m.group(1)


def test_the_sdm630_example_stores_the_documented_readings(
    config_file: ConfigFactory, tmp_path: Path
) -> None:
    example = yaml.safe_load(block_after("<!-- example: sdm630"))
    table = block_after("<!-- readings: sdm630 -->").splitlines()[2:]
    documented = {}
    for line in table:
        device, _ts, metric, value, source = line.split()
        documented[metric] = float(value)
        assert (device, source) == ("SDM630-0042", "modbus:SDM630-0042")
    (meter,) = example["poll"]["modbus"]
    address = {r["metric"]: r["address"] for r in meter["registers"]}
    assert set(address) == set(documented)
    mem = Memory()
    for metric, value in documented.items():
        mem.put("input", address[metric], words("float32", value))
    with simulator() as sim, pty_pair(tmp_path) as (line, far_end):
        sim.rtu(far_end, [mem.device(meter["unit"])], baudrate=meter["baudrate"])
        meter["serial"] = line
        config = config_file(overrides=example)
        r = run_fieldgate("poll", "--once", config=config)
        assert r.returncode == 0, r
        status = json.loads(run_fieldgate("status", "--json", config=config).stdout)
        assert sim.requests == 2
    db = yaml.safe_load(config.read_text())["store"]["path"]
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT metric, value FROM readings").fetchall())
    conn.close()
    assert stored == pytest.approx(documented, rel=1e-14)
    (device,) = status["modbus"]["devices"]
    assert (device["device"], device["requests"], device["readings"]) == ("SDM630-0042", 2, 14)
