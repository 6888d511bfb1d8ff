"""Run ``fieldgate ARGS...`` under cProfile in every thread and print where the CPU goes.

The uploader cuts batches on a thread of its own while the main thread sends them; cProfile
only sees the thread that enabled it, so each thread gets its own profiler (wrapped around
the thread's start) and the summary adds them up. The timer is the thread's CPU time, so
waiting on the hub or on the other thread counts nothing. ``bench/upload/run.py --profile`` runs the
uploader through this; by hand:

    .venv/bin/python bench/upload/profile_uploader.py OUT.prof --config C upload --once

Prints the functions with the most own time and their share of the total, plus the
cumulative share of a few named steps, and writes the merged stats to OUT.prof.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time
from typing import Any

#: Steps worth naming in the summary: (label, file suffix, function name).
STEPS = (
    ("cut, all of it", "batches.py", "cut_batch"),
    ("cut: render CSV", "batchfile.py", "render_csv"),
    ("cut: zip + fsync", "batches.py", "write_zip"),
    ("cut: record (transaction)", "batches.py", "_record"),
    ("send: deliver", "uploader.py", "deliver"),
)


def _profiled_threads() -> list[cProfile.Profile]:
    profiles: list[cProfile.Profile] = []
    # Thread subclasses override run(); every thread goes through _bootstrap_inner.
    inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def profiled(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        profiles.append(prof)
        prof.enable()
        try:
            inner(self)
        finally:
            prof.disable()

    threading.Thread._bootstrap_inner = profiled  # type: ignore[attr-defined]
    return profiles


def summary(stats: pstats.Stats, top: int = 12) -> str:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in raw.values()) or 1.0
    lines = [f"profiled CPU time (all threads): {total:.2f} s"]
    for label, suffix, name in STEPS:
        cum = sum(
            ct
            for (f, _, fn), (_, _, _, ct, _) in raw.items()
            if fn == name and f.endswith(suffix)
        )
        lines.append(
            f"  {label:28s} {cum:6.2f} s cumulative  {100 * cum / total:5.1f}%"
        )
    lines.append(f"  top {top} by own time:")
    ranked = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (f, line, fn), (_, _, tt, _, _) in ranked:
        where = f"{f.rsplit('/', 1)[-1]}:{line}" if line else "~"
        lines.append(f"    {100 * tt / total:5.1f}%  {tt:6.2f} s  {fn} ({where})")
    return "\n".join(lines)


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    profiles = _profiled_threads()
    from fieldgate.cli import main as fieldgate_main

    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    try:
        rc = fieldgate_main(argv)
    finally:
        prof.disable()
    stats = pstats.Stats(prof)
    for p in profiles:
        stats.add(p)
    stats.dump_stats(out)
    print(summary(stats), file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
