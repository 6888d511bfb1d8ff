"""The options of a format, prepared once from the configuration (time zone loaded, paths
split), so that decoding a message repeats no work that depends only on the input."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from fieldgate.formats.common import zone


@dataclass(frozen=True, slots=True)
class CsvSpec:
    """``csv:`` of an input: how a line is split and what each column holds."""

    delimiter: str = ","
    #: Column roles in order: ``ts``, ``device``, ``-`` (not read) or a metric name.
    columns: tuple[str, ...] = ()
    ts_unit: str = "ms"
    header: bool = False


@dataclass(frozen=True, slots=True)
class Options:
    """What a decoder needs to know about its input besides the payload."""

    tz: dt.tzinfo = dt.UTC
    #: False: the payload's own time is ignored; every reading takes the arrival time.
    payload_time: bool = True
    ts_path: str | None = None
    metrics_path: str | None = None
    ts_unit: str = "ms"
    influx_precision: str = "ns"
    csv: CsvSpec = field(default_factory=CsvSpec)


def options_from(cfg: Any) -> Options:
    """Options from an input's (or poll node's) configuration (see fieldgate.config)."""
    csv_cfg = getattr(cfg, "csv", None)
    csv = (
        CsvSpec(
            delimiter=csv_cfg.delimiter,
            columns=tuple(csv_cfg.columns),
            ts_unit=csv_cfg.ts_unit,
            header=csv_cfg.header,
        )
        if csv_cfg is not None
        else CsvSpec()
    )
    return Options(
        tz=zone(cfg.timezone),
        payload_time=cfg.ts_from == "payload",
        ts_path=cfg.ts_path,
        metrics_path=cfg.metrics_path,
        ts_unit=cfg.ts_unit or "ms",
        influx_precision=cfg.influx_precision or "ns",
        csv=csv,
    )
