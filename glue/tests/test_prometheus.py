"""``fieldgate status --prometheus``: read back with Prometheus' own text-format parser."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import run_fieldgate

from fieldgate import store
from fieldgate.inputs import STATE_PREFIX, InputCounts


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def make_store(config: Path) -> None:
    db = Path(yaml.safe_load(config.read_text())["store"]["path"])
    conn = store.open_store(db, "GW-TEST")
    now = store.now_ms()
    with store.transaction(conn):
        store.insert_readings(
            conn,
            [("TH-001", now - 1000, "temperature", 20.0), ("TH-001", now, "humidity", 41.0)],
            source="test",
        )
        store.insert_readings(conn, [('TH-"2"', now - 5000, "t", 1.0)], source="test")
        store.insert_rejected(conn, source="mqtt", topic="x", payload=b"{", reason="bad JSON")
        store.set_state(conn, "collector.state", "running")
        store.set_state(conn, "collector.heartbeat", "alive")
        store.set_state(conn, "upload.last_success", "batch B1 stored")
        counts = InputCounts(messages=7, readings=12, skipped=2, rejected=1)
        store.set_state(conn, STATE_PREFIX + "fieldgate/{device}/readings", counts.to_json())
    conn.close()


def test_status_in_prometheus_text_format(config_file):
    config = config_file()
    make_store(config)
    before = time.time()
    r = run_fieldgate("status", "--prometheus", config=config)
    assert r.returncode == 0, r.stderr
    got = samples(r.stdout)
    assert got["fieldgate_info", (("site", "GW-TEST"),)] == 1
    assert got["fieldgate_store_exists", ()] == 1
    assert got["fieldgate_readings", ()] == 3
    assert got["fieldgate_backlog_readings", ()] == 3
    assert got["fieldgate_rejected_messages", ()] == 1
    assert got["fieldgate_batches", (("state", "pending"),)] == 0
    assert got["fieldgate_collector_state", (("state", "running"),)] == 1
    assert got["fieldgate_export_state", (("state", "normal_operation"),)] == 1
    assert got["fieldgate_upload_mode", (("mode", "LIVE"),)] == 1
    assert 0 <= got["fieldgate_upload_last_success_age_seconds", ()] < 60
    assert before - 2 <= got["fieldgate_upload_last_success_timestamp_seconds", ()] <= time.time()
    assert 0 < got["fieldgate_disk_used_ratio", ()] < 1
    assert got["fieldgate_disk_stop_accepting_ratio", ()] == 0.98
    native = (("format", "fieldgate"), ("topic", "fieldgate/{device}/readings"))
    assert got["fieldgate_input_messages_total", native] == 7
    assert got["fieldgate_input_readings_total", native] == 12
    assert got["fieldgate_input_skipped_total", native] == 2
    assert got["fieldgate_input_rejected_total", native] == 1
    assert got["fieldgate_device_readings", (("device", "TH-001"),)] == 2
    assert got["fieldgate_device_readings", (("device", 'TH-"2"'),)] == 1  # escaped and back
    last = got["fieldgate_device_last_reading_timestamp_seconds", (("device", "TH-001"),)]
    assert before - 2 <= last <= time.time()
    families = {f.name: f.type for f in text_string_to_metric_families(r.stdout)}
    assert families["fieldgate_input_messages"] == "counter"
    assert families["fieldgate_readings"] == "gauge"


def test_no_store_yet(config_file):
    r = run_fieldgate("status", "--prometheus", config=config_file())
    got = samples(r.stdout)
    assert r.returncode == 0 and got["fieldgate_store_exists", ()] == 0
    assert "fieldgate_disk_used_ratio" in {k[0] for k in got}


def test_output_is_written_atomically_and_readable_by_node_exporter(config_file, tmp_path):
    config = config_file()
    make_store(config)
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    target = out_dir / "fieldgate.prom"
    target.write_text("old\n")
    before = target.stat().st_ino
    r = run_fieldgate("status", "--prometheus", "--output", str(target), config=config)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert target.stat().st_ino != before  # a new file renamed over the old one
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert samples(target.read_text())["fieldgate_readings", ()] == 3
    assert sorted(p.name for p in out_dir.iterdir()) == ["fieldgate.prom"]  # no temporary left
    r = run_fieldgate("status", "--json", "--output", str(out_dir / "s.json"), config=config)
    assert json.loads((out_dir / "s.json").read_text())["site"] == "GW-TEST"


def test_output_refusals_are_one_line(config_file, tmp_path):
    config = config_file()
    r = run_fieldgate(
        "status", "--prometheus", "--output", str(tmp_path / "no" / "f"), config=config
    )
    assert r.returncode == 1 and "directory" in r.stderr and r.stderr.count("\n") == 1
    r = run_fieldgate("status", "--json", "--prometheus", config=config)
    assert r.returncode == 1 and "not both" in r.stderr
