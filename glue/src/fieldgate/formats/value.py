"""``value``: the payload is one reading, named by the topic's ``{metric}`` level.

ESPHome publishes each sensor on ``<node>/sensor/<name>/state`` as the bare number (``21.5``)
and each binary sensor as ``ON``/``OFF``: an input ``{device}/sensor/{metric}/state`` with
``format: value`` takes them as they are. A payload that is not a number, ON/OFF or
true/false (ESPHome's ``nan`` for a sensor without a state) is no reading: skipped and
counted, and the message is rejected with that reason.
"""

from __future__ import annotations

from fieldgate.formats.common import Decoded, Sample, text_number
from fieldgate.formats.options import Options


def decode(text: str, opts: Options, metric: str | None) -> Decoded:
    """One payload of an input with ``format: value`` (``metric`` is the topic's level)."""
    d = Decoded()
    name = metric or "value"
    value = text_number(text)
    if value is None:
        d.skip(name, text.strip())
    else:
        d.samples.append(Sample([(name, value)]))
    return d
