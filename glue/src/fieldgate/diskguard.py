"""The disk guard: intake pauses when the store's filesystem is nearly full.

Above ``disk.stop_accepting_at_percent`` of the filesystem holding the store, the collector
stops taking messages from the broker (they stay queued there; nothing is acknowledged that
is not committed), and it resumes below ``disk.resume_below_percent`` (default one point
under the stop threshold). The two thresholds give hysteresis, so intake does not flap
around one value. Usage is measured like ``df``'s Use% (space reserved for root counts as
used), checked at most every ``disk.check_interval_secs``.

A collector started on a disk too full to open its store (:func:`open_store_when_room`)
waits, saying so, and goes on by itself once there is room.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fieldgate import store
from fieldgate.config import Config
from fieldgate.daemon import StopFlag
from fieldgate.errors import FieldgateError
from fieldgate.fsutil import disk_usage_percent, free_bytes

log = logging.getLogger("fieldgate.collector")

#: Less free space than this counts as a full disk whatever the thresholds say (SQLite
#: needs room for its write-ahead log and its index before it can open a store).
NO_ROOM_BYTES = 1 << 20
#: What SQLite says when it cannot open a store for lack of space (its -wal and -shm).
NO_SPACE_TEXTS = ("disk I/O error", "database or disk is full", "unable to open database file")


def is_disk_full(exc: BaseException) -> bool:
    """True when SQLite gave up because the filesystem is full (SQLITE_FULL)."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    return "database or disk is full" in str(exc)


def pause_text(used: float, stop_at: float) -> str:
    """The ``collector.state`` value while paused, e.g. ``paused: disk 98.5% used ≥ 98%``."""
    return f"paused: disk {used:.1f}% used ≥ {stop_at:g}%"


@dataclass
class DiskGuard:
    """Hysteresis over the used percentage of the filesystem holding ``path``."""

    path: Path
    stop_at: float
    resume_below: float
    interval_secs: float
    usage: Callable[[Path], float] = field(default=disk_usage_percent)
    paused: bool = False
    last_used: float = 0.0
    _next_check: float = 0.0

    @classmethod
    def for_store(cls, cfg: Config) -> DiskGuard:
        """The guard of the filesystem that holds ``store.path``."""
        return cls(
            path=Path(cfg.store.path).parent,
            stop_at=cfg.disk.stop_accepting_at_percent,
            resume_below=cfg.disk.resume_percent,
            interval_secs=cfg.disk.check_interval_secs,
        )

    def measure(self) -> float:
        self.last_used = self.usage(self.path)
        return self.last_used

    def check(self, *, force: bool = False) -> bool | None:
        """Re-measure when due; returns True when intake must pause now, False when it may
        resume now, and None when nothing changed (or it was not time to look yet)."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return None
        self._next_check = now + self.interval_secs
        used = self.measure()
        if not self.paused and used >= self.stop_at:
            self.paused = True
            return True
        if self.paused and used < self.resume_below:
            self.paused = False
            return False
        return None

    def describe(self) -> str:
        """Why intake is paused, for the state, the log and the event."""
        return pause_text(self.last_used, self.stop_at)

    def resumed_text(self) -> str:
        return f"disk {self.last_used:.1f}% used < {self.resume_below:g}%: intake resumed"


def open_store_when_room(cfg: Config, stop: StopFlag, publish: Callable[[str], None]) -> bool:
    """Open (create, migrate) the store once, waiting while its filesystem is too full to;
    ``publish`` gets the state to show meanwhile. False when stopped while waiting.

    A failure on a disk that has room is the operator's to fix: FieldgateError.
    """
    guard = DiskGuard.for_store(cfg)
    waiting_since: str | None = None
    while True:
        try:
            store.open_store(
                cfg.store.path, cfg.site.serial, busy_timeout_ms=cfg.store.busy_timeout_ms
            ).close()
        except FieldgateError as exc:
            if not any(t in str(exc) for t in NO_SPACE_TEXTS) or not guard.path.is_dir():
                raise  # another site's store, a newer schema, no directory: not space
            used = guard.measure()
            if used < guard.stop_at and not _no_room(guard.path):
                raise
            state = f"waiting for disk space: {used:.1f}% used, the store cannot be opened ({exc})"
            if waiting_since is None:
                waiting_since = store.iso_now()
                log.error(
                    "%s; the broker keeps the messages; retrying every %g s",
                    state,
                    guard.interval_secs,
                )
            publish(state)
            if stop.wait(guard.interval_secs):
                return False
            continue
        if waiting_since is not None:
            log.warning("disk space returned (waiting since %s): the store is open", waiting_since)
        return True


def _no_room(path: Path) -> bool:
    try:
        return free_bytes(path) < NO_ROOM_BYTES
    except OSError:
        return False
