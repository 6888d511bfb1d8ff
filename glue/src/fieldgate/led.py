"""The export LED: a Linux LED class device (``/sys/class/leds/<name>``), docs/contract.md §7.

=================== ======================= =============================================
state               meaning                 LED
=================== ======================= =============================================
normal_operation    no export running       steady on (trigger none, max brightness)
in_progress         exporting, keep drive   timer trigger, 500 ms on / 500 ms off
error               export failed           off (trigger none, brightness 0)
success             drive may be removed    timer trigger, 250 ms on / 250 ms off
=================== ======================= =============================================

The LED is only an indicator: a missing or unwritable LED is logged and never stops an
export. Every change is also published to the store (``export.state``) so ``fieldgate
status`` shows it, and written to the export log (``led: <state>``), which is the history
an operator (and the tests) can read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fieldgate.led")

NORMAL = "normal_operation"
IN_PROGRESS = "in_progress"
ERROR = "error"
SUCCESS = "success"


@dataclass(frozen=True)
class Pattern:
    """How one state looks: steady at ``brightness`` or blinking with the timer trigger."""

    on: bool
    delay_on_ms: int = 0
    delay_off_ms: int = 0

    @property
    def blinks(self) -> bool:
        return self.on and self.delay_on_ms > 0


PATTERNS: dict[str, Pattern] = {
    NORMAL: Pattern(on=True),
    IN_PROGRESS: Pattern(on=True, delay_on_ms=500, delay_off_ms=500),
    ERROR: Pattern(on=False),
    SUCCESS: Pattern(on=True, delay_on_ms=250, delay_off_ms=250),
}

STATES = tuple(PATTERNS)


def _write(path: Path, value: str) -> None:
    # sysfs attributes take one write of the whole value; O_TRUNC is ignored there and keeps
    # the stand-in directory used by tests equal to what was written last.
    with path.open("w", encoding="ascii") as f:
        f.write(value + "\n")


def _max_brightness(led: Path) -> str:
    try:
        value = (led / "max_brightness").read_text(encoding="ascii").strip()
    except OSError:
        return "1"
    return value if value.isdigit() and int(value) > 0 else "1"


def apply_pattern(led_path: str | Path, state: str) -> None:
    """Drive the LED class device at ``led_path`` into ``state``; OSError if it cannot."""
    pattern = PATTERNS[state]
    led = Path(led_path)
    if not led.is_dir():
        raise FileNotFoundError(2, "no LED class device", str(led))
    if pattern.blinks:
        # The timer trigger creates delay_on/delay_off; set them after selecting it.
        _write(led / "trigger", "timer")
        _write(led / "delay_on", str(pattern.delay_on_ms))
        _write(led / "delay_off", str(pattern.delay_off_ms))
        _write(led / "brightness", _max_brightness(led))
    else:
        _write(led / "trigger", "none")
        _write(led / "brightness", _max_brightness(led) if pattern.on else "0")


def read_pattern(led_path: str | Path) -> str | None:
    """The state the LED device currently shows, read back from its attributes (or None)."""
    led = Path(led_path)
    try:
        trigger = (led / "trigger").read_text(encoding="ascii")
        brightness = (led / "brightness").read_text(encoding="ascii").strip()
    except OSError:
        return None
    # sysfs shows every trigger with the active one in brackets; a plain value is the
    # stand-in directory after a write.
    words = trigger.split()
    active = next((w.strip("[]") for w in words if w.startswith("[")), words[0] if words else "")
    if active == "timer":
        try:
            on = int((led / "delay_on").read_text(encoding="ascii"))
            off = int((led / "delay_off").read_text(encoding="ascii"))
        except (OSError, ValueError):
            return None
        for state, p in PATTERNS.items():
            if p.blinks and (p.delay_on_ms, p.delay_off_ms) == (on, off):
                return state
        return None
    if active == "none":
        return NORMAL if brightness not in ("", "0") else ERROR
    return None


class Led:
    """The export LED plus its two mirrors: the store's ``export.state`` and the log."""

    def __init__(
        self,
        led_path: str | None,
        *,
        publish: Callable[[str], None] | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.led_path = led_path
        self.publish = publish
        self.note = note
        self.state: str | None = None

    def set(self, state: str) -> None:
        """Show ``state``; failures of the LED or the store are logged, never raised."""
        if state not in PATTERNS:
            raise ValueError(f"unknown LED state {state!r}")
        self.state = state
        if self.note is not None:
            self.note(f"led: {state}")
        if self.led_path:
            try:
                apply_pattern(self.led_path, state)
            except OSError as exc:
                log.warning("LED %s: cannot show %s: %s", self.led_path, state, exc.strerror or exc)
        if self.publish is not None:
            try:
                self.publish(state)
            except Exception as exc:  # the store is busy or gone: the LED still works
                log.warning("cannot publish export.state %s to the store: %s", state, exc)
