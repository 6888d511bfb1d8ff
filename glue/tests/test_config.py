"""Configuration loading: every mistake is one line naming the key and the file."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from support import run_fieldgate

from fieldgate.config import Config, check_configs, load_config, parse_config, redacted
from fieldgate.errors import ConfigError


def test_minimal_config_gets_contract_defaults() -> None:
    cfg = parse_config({"site": {"serial": "GW-0001"}})
    assert cfg.store.path == "/var/lib/fieldgate/data_store.db"
    assert cfg.store.retention_days == 90
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.topic_prefix) == ("127.0.0.1", 1883, "fieldgate")
    assert cfg.upload.mode == "LIVE"
    assert cfg.upload.batch_max_rows == 50000
    assert cfg.disk.stop_accepting_at_percent == 98
    assert cfg.export.led_path == "/sys/class/leds/gpo1"
    assert cfg.devices.allow_unknown is False


def test_device_resolves_by_serial_and_alias() -> None:
    cfg = parse_config(
        {"site": {"serial": "GW-1"}, "devices": {"list": [{"serial": "TH-001", "alias": "roof"}]}}
    )
    assert cfg.devices.resolve("TH-001") == "TH-001"
    assert cfg.devices.resolve("roof") == "TH-001"
    assert cfg.devices.resolve("other") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "site: required key is missing"),
        ({"site": {}}, "site.serial: required key is missing"),
        ({"site": {"serial": 1}}, "site.serial: expected a string, got integer 1 (quote it)"),
        ({"site": {"serial": "GW"}, "sitee": {}}, "sitee: unknown key"),
        ({"site": {"serial": "GW"}, "mqtt": {"port": "x"}}, "mqtt.port: expected an integer"),
        ({"site": {"serial": "GW"}, "mqtt": {"port": 0}}, "mqtt.port: must be at least 1"),
        ({"site": {"serial": "GW"}, "mqtt": {"prot": 1}}, "mqtt.prot: unknown key"),
        ({"site": {"serial": "GW"}, "upload": {"mode": "live"}}, "upload.mode: must be one of"),
        (
            {"site": {"serial": "GW"}, "devices": {"list": [{"alias": "a"}]}},
            "devices.list[0].serial: required key is missing",
        ),
        ({"site": {"serial": "GW"}, "devices": {"list": "TH-1"}}, "devices.list: expected a list"),
        (
            {"site": {"serial": "GW"}, "devices": {"allow_unknown": "yes"}},
            "devices.allow_unknown: expected true or false",
        ),
        ({"site": {"serial": "GW/1"}}, "site.serial: 'GW/1' is not a valid value here"),
        # ':' is refused in every name that can end up in a file name (FAT forbids it)
        ({"site": {"serial": "GW:1"}}, "site.serial: 'GW:1' is not a valid value here"),
        (
            {"site": {"serial": "GW"}, "devices": {"list": [{"serial": "TH", "alias": "a:b"}]}},
            "devices.list[0].alias: 'a:b' is not a valid value here",
        ),
        ({"site": {"serial": "GW"}, "mqtt": {"topic_prefix": "f:g"}}, "mqtt.topic_prefix: 'f:g'"),
        (
            {"site": {"serial": "GW"}, "devices": {"list": [{"serial": "A"}, {"serial": "A"}]}},
            "devices.list[1]: name 'A' is already used",
        ),
        (
            {
                "site": {"serial": "GW"},
                "devices": {"list": [{"serial": "C", "format": "csv", "csv_columns": ["t", "x"]}]},
            },
            "devices.list[0].csv_columns: a csv device needs a 'ts' column",
        ),
        (
            {
                "site": {"serial": "GW"},
                "poll": {"nodes": [{"name": "n", "url": "http://x/", "device": "nope"}]},
            },
            "poll.nodes[0].device: 'nope' is not in devices.list",
        ),
    ],
)
def test_bad_config_is_one_clear_error(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "/etc/fieldgate/fieldgate.yaml")
    assert str(err.value).startswith("/etc/fieldgate/fieldgate.yaml: ")
    assert message in str(err.value)


def test_secret_file_errors_name_key_and_file(tmp_path: Path) -> None:
    cfg = parse_config(
        {"site": {"serial": "GW"}, "mqtt": {"password_file": str(tmp_path / "missing")}},
        "cfg.yaml",
    )
    with pytest.raises(
        ConfigError, match=r"cfg.yaml: mqtt.password_file: secret file .*missing does not exist"
    ):
        cfg.secret("mqtt.password_file")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cfg = parse_config({"site": {"serial": "GW"}, "mqtt": {"password_file": str(empty)}}, "c")
    with pytest.raises(ConfigError, match="is empty"):
        cfg.secret("mqtt.password_file")
    full = tmp_path / "pw"
    full.write_text("  s3cret \n")
    cfg = parse_config({"site": {"serial": "GW"}, "mqtt": {"password_file": str(full)}}, "c")
    assert cfg.secret("mqtt.password_file") == "s3cret"


def test_redacted_removes_secret_bearing_keys() -> None:
    raw = {
        "site": {"serial": "GW"},
        "mqtt": {"username": "c", "password_file": "/x"},
        "upload": {"key_file": "/k", "url": "http://h"},
    }
    assert redacted(raw) == {
        "site": {"serial": "GW"},
        "mqtt": {"username": "c"},
        "upload": {"url": "http://h"},
    }


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("site:\n  serial: [GW\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line"):
        load_config(str(p))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("site: {serial: GW}\nmqtt: {port: 70000}\n", "mqtt.port: must be at most 65535"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("site: {serial: GW}\nlog: {level: LOUD}\n", "log.level: must be one of"),
    ],
)
def test_cli_exits_2_with_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    p = tmp_path / "fieldgate.yaml"
    if content is not None:
        p.write_text(content)
    for command in (["status"], ["collect"], ["devices", "list"], ["upload", "--once"]):
        r = run_fieldgate(*command, config=p)
        assert r.returncode == 2, (command, r)
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("fieldgate: error: ") and message in r.stderr
        assert "Traceback" not in r.stderr


def test_config_flag_overrides_environment(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("site: {serial: GW-FLAG}\n")
    r = run_fieldgate("--config", str(good), "check-config", config=tmp_path / "missing.yaml")
    assert r.returncode == 0, r
    assert "GW-FLAG" in r.stdout
    r = run_fieldgate("check-config", "--config", str(good), config=tmp_path / "missing.yaml")
    assert r.returncode == 0, r


def test_check_configs_judges_each_configuration_by_name() -> None:
    problems = check_configs(
        {
            "gw-a": "site: {serial: GW-A}\n",
            "gw-b": "site: {serial: GW-B}\nlog: {level: LOUD}\n",
            "gw-c": "site: [\n",
        }
    )
    assert problems["gw-a"] == ""
    assert problems["gw-b"].startswith("gw-b: log.level: must be one of")
    assert problems["gw-c"].startswith("gw-c: not valid YAML")


def test_check_configs_cli_one_line_per_refused_configuration() -> None:
    r = run_fieldgate(
        "check-configs",
        stdin='{"gw-a": "site: {serial: GW-A}\\n", "gw-b": "- a\\n"}',
    )
    assert r.returncode == 2, r
    assert r.stdout == "gw-a: valid\n"
    assert r.stderr == "fieldgate: error: gw-b: the top level must be a mapping of sections\n"
    r = run_fieldgate("check-configs", stdin='{"gw-a": "site: {serial: GW-A}\\n"}')
    assert (r.returncode, r.stdout, r.stderr) == (0, "gw-a: valid\n", "")
    for bad in ("[1]", '{"gw-a": 1}', "not json"):
        r = run_fieldgate("check-configs", stdin=bad)
        assert r.returncode == 2, (bad, r)
        assert r.stderr.startswith("fieldgate: error: stdin: not a JSON object of configurations")
        assert r.stderr.count("\n") == 1 and r.stdout == ""


def float_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every number key of the sections that are mappings (not lists)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if optional else [tp]
        if inner == [float]:
            keys.append(f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(inner[0]) and len(inner) == 1:
            keys.extend(float_keys(inner[0], f"{prefix}{f.name}."))  # type: ignore[arg-type]
    return keys


def with_key(dotted: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"site": {"serial": "GW"}}
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


def test_every_number_key_refuses_nan_and_infinity() -> None:
    keys = float_keys(Config)
    assert "disk.stop_accepting_at_percent" in keys and "upload.timeout_secs" in keys
    assert len(keys) == 10, keys
    for key in keys:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError) as err:
                parse_config(with_key(key, value), "gw.yaml")
            assert str(err.value) == (
                f"gw.yaml: {key}: must be a finite number, got number {value!r}"
            ), key
    modbus = {
        "site": {"serial": "GW"},
        "devices": {"list": [{"serial": "M"}]},
        "poll": {
            "modbus": [
                {
                    "device": "M",
                    "host": "127.0.0.1",
                    "registers": [
                        {"metric": "p", "address": 0, "table": "holding", "scale": math.nan}
                    ],
                }
            ]
        },
    }
    with pytest.raises(ConfigError, match=r"poll.modbus\[0\].registers\[0\].scale: must be a fin"):
        parse_config(modbus, "gw.yaml")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"site:\n  serial: GW\n  name: caf\xe9\n",
            "gw.yaml: not UTF-8 text: byte 0xe9 at line 3 (save the file as UTF-8)",
        ),
        (
            b"site: {serial: GW}\ndisk:\n  stop_accepting_at_percent: .nan\n",
            "gw.yaml: disk.stop_accepting_at_percent: must be a finite number, got number nan",
        ),
        (
            b"site: {serial: GW}\nupload:\n  interval_secs: .inf\n",
            "gw.yaml: upload.interval_secs: must be a finite number, got number inf",
        ),
        (
            b"site: {serial: GW}\ndisk: {stop_accepting_at_percent: 90}\n"
            b"disk: {stop_accepting_at_percent: 99}\n",
            "gw.yaml: not valid YAML at line 3: duplicate key 'disk' (first given at line 2)",
        ),
        (
            b"site: {serial: GW}\nmqtt:\n  inputs:\n    - topic: a/{device}\n      format: value\n"
            b"      device: x\n      format: json\n",
            "gw.yaml: not valid YAML at line 7: duplicate key 'format' (first given at line 5)",
        ),
        (
            b"site: {serial: GW}\nstore:\n  retention_days: " + b"9" * 5000 + b"\n",
            "gw.yaml: not valid YAML: an integer of more than 4300 digits",
        ),
        (b"site: " + b"[" * 5000 + b"\n", "gw.yaml: not valid YAML: nested too deeply"),
    ],
)
def test_hostile_config_is_one_line_and_exit_2(
    tmp_path: Path, content: bytes, message: str
) -> None:
    p = tmp_path / "gw.yaml"
    p.write_bytes(content)
    for command in (["check-config"], ["status"]):
        r = run_fieldgate(*command, config=p)
        assert r.returncode == 2, (command, r)
        assert r.stderr == f"fieldgate: error: {p.parent}/{message}\n", r.stderr


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text("site:\n  <<: {serial: GW-A, name: x}\n  serial: GW-B\n")
    assert load_config(str(p)).site.serial == "GW-B"
