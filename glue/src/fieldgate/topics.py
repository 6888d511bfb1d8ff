"""Topic templates of ``mqtt.inputs`` (docs/inputs.md): parsed once, matched per message.

A template is an MQTT topic filter whose levels may also be ``{device}`` and ``{metric}``
(each a whole level, each at most once): ``tele/{device}/SENSOR``,
``{device}/sensor/{metric}/state``. ``+`` is a level matched and ignored; ``#``, only as the
last level, matches what follows (and its parent). The broker is subscribed to the filter
(``{device}`` and ``{metric}`` become ``+``); a received topic is matched back to its
template to read the captured levels.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE = "{device}"
METRIC = "{metric}"
_WILD = ("+", DEVICE, METRIC)
#: MQTT's limit on a topic (a UTF-8 string with a 16-bit length).
MAX_TOPIC_BYTES = 65535


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed topic template."""

    text: str
    levels: tuple[str, ...]
    device_at: int | None
    metric_at: int | None
    #: Ends with ``#``: matches topics of at least ``len(levels) - 1`` levels.
    multi: bool
    #: (index, text) of every literal level, checked when matching.
    literals: tuple[tuple[int, str], ...]

    @property
    def filter(self) -> str:
        """The MQTT subscription of the template."""
        return "/".join("+" if lv in (DEVICE, METRIC) else lv for lv in self.levels)

    def match(self, parts: list[str]) -> bool:
        """Whether a topic (split at ``/``) is one of this template's."""
        n = len(self.levels)
        if self.multi:
            if len(parts) < n - 1:
                return False
        elif len(parts) != n:
            return False
        return all(parts[i] == text for i, text in self.literals)


def parse_template(text: str) -> Template:
    """Parse a template; ValueError says what is wrong with it, in words."""
    if not isinstance(text, str) or not text:
        raise ValueError("empty topic")
    if len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError("longer than MQTT allows (65535 bytes)")
    if "\0" in text:
        raise ValueError("contains a NUL character")
    if text.startswith("$"):
        raise ValueError("topics starting with $ are the broker's own")
    levels = tuple(text.split("/"))
    device_at = metric_at = None
    literals = []
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise ValueError("'#' must be the last level")
            continue
        if level == "+":
            continue
        if level == DEVICE:
            if device_at is not None:
                raise ValueError("{device} may appear only once")
            device_at = i
            continue
        if level == METRIC:
            if metric_at is not None:
                raise ValueError("{metric} may appear only once")
            metric_at = i
            continue
        for bad in ("#", "+", "{", "}"):
            if bad in level:
                what = "'#' and '+'" if bad in "#+" else "{device} and {metric}"
                raise ValueError(f"{what} must be whole levels (level {level!r})")
        literals.append((i, level))
    return Template(
        text=text,
        levels=levels,
        device_at=device_at,
        metric_at=metric_at,
        multi=levels[-1] == "#",
        literals=tuple(literals),
    )


def overlap(a: Template, b: Template) -> str | None:
    """A topic both templates match (so a message would have two inputs), or None."""
    la, lb = a.levels, b.levels
    example: list[str] = []
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else None
        y = lb[i] if i < len(lb) else None
        if x == "#" or y == "#":
            other = lb if x == "#" else la
            rest = [("x" if lv in _WILD else lv) for lv in other[i:] if lv != "#"]
            return "/".join(example + rest) or "x"
        if x is None or y is None:
            return None
        xw = x in _WILD
        yw = y in _WILD
        if not xw and not yw and x != y:
            return None
        example.append(y if xw and not yw else x if not xw else "x")
    return "/".join(example)
