"""The LED driver against a directory standing in for a Linux LED class device."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fieldgate import led


def make_led_dir(root: Path, max_brightness: str = "1") -> Path:
    d = root / "gpo1"
    d.mkdir()
    for attr, value in (
        ("brightness", "0"),
        ("max_brightness", max_brightness),
        ("trigger", "[none] timer heartbeat"),
        ("delay_on", "0"),
        ("delay_off", "0"),
    ):
        (d / attr).write_text(value + "\n")
    return d


def attrs(d: Path) -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in d.iterdir()}


@pytest.mark.parametrize(
    ("state", "trigger", "brightness", "delays"),
    [
        ("normal_operation", "none", "1", None),
        ("in_progress", "timer", "1", ("500", "500")),
        ("error", "none", "0", None),
        ("success", "timer", "1", ("250", "250")),
    ],
)
def test_each_state_sets_the_contract_pattern(
    tmp_path: Path, state: str, trigger: str, brightness: str, delays: tuple[str, str] | None
) -> None:
    d = make_led_dir(tmp_path)
    led.apply_pattern(d, state)
    a = attrs(d)
    assert a["trigger"] == trigger
    assert a["brightness"] == brightness
    if delays:
        assert (a["delay_on"], a["delay_off"]) == delays
    assert led.read_pattern(d) == state


def test_steady_on_uses_max_brightness(tmp_path: Path) -> None:
    d = make_led_dir(tmp_path, max_brightness="255")
    led.apply_pattern(d, "normal_operation")
    assert attrs(d)["brightness"] == "255"
    led.apply_pattern(d, "error")
    assert attrs(d)["brightness"] == "0"


def test_going_from_blinking_back_to_steady(tmp_path: Path) -> None:
    d = make_led_dir(tmp_path)
    for state in ("normal_operation", "in_progress", "success", "normal_operation"):
        led.apply_pattern(d, state)
        assert led.read_pattern(d) == state


def test_read_pattern_understands_sysfs_bracket_syntax(tmp_path: Path) -> None:
    d = make_led_dir(tmp_path)
    (d / "trigger").write_text("none [timer] heartbeat\n")
    (d / "delay_on").write_text("250\n")
    (d / "delay_off").write_text("250\n")
    (d / "brightness").write_text("1\n")
    assert led.read_pattern(d) == "success"


def test_led_mirrors_state_to_store_and_log(tmp_path: Path) -> None:
    d = make_led_dir(tmp_path)
    published: list[str] = []
    notes: list[str] = []
    lamp = led.Led(str(d), publish=published.append, note=notes.append)
    lamp.set("in_progress")
    lamp.set("success")
    assert published == ["in_progress", "success"]
    assert notes == ["led: in_progress", "led: success"]
    assert lamp.state == "success"
    assert led.read_pattern(d) == "success"


def test_missing_led_or_failing_store_never_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_store(_state: str) -> None:
        raise RuntimeError("database is locked")

    lamp = led.Led(str(tmp_path / "no-such-led"), publish=broken_store)
    with caplog.at_level(logging.WARNING):
        lamp.set("error")
    assert lamp.state == "error"
    assert "cannot show error" in caplog.text
    assert "cannot publish export.state" in caplog.text


def test_no_led_configured(tmp_path: Path) -> None:
    notes: list[str] = []
    lamp = led.Led(None, note=notes.append)
    lamp.set("success")
    assert notes == ["led: success"]


def test_unknown_state_is_a_bug(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown LED state"):
        led.Led(None).set("blinking")
