"""Retention at the hub: readings older than N days are deleted in small batches.

``fieldgate hub serve --retention-days N`` runs :func:`run` in a process of its own beside
the web workers; ``fieldgate hub prune --days N`` makes one pass. Each batch is one short
transaction of at most :data:`BATCH_ROWS` readings of one series
(:meth:`~fieldgate.hub.storage.HubStorage.delete_before`), and after each the pass waits at
least as long as the batch took, so ingest (which needs the same SQLite write lock, or the
same series rows on PostgreSQL) always gets its turn: retention slows down, ingest does not.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable

from fieldgate.daemon import StopFlag, setup_logging
from fieldgate.errors import FieldgateError
from fieldgate.hub.storage import HubStorage
from fieldgate.store import iso_utc, now_ms

log = logging.getLogger("fieldgate.hub.retention")

#: Readings deleted per transaction.
BATCH_ROWS = 5000
#: How often the background process looks for readings to delete.
INTERVAL_SECS = 3600.0
DAY_MS = 86_400_000


def prune(
    st: HubStorage,
    days: float,
    *,
    batch_rows: int = BATCH_ROWS,
    pause: Callable[[float], bool] | None = None,
) -> tuple[int, int]:
    """Delete the readings older than ``days`` days, batch by batch; (deleted, cutoff ms).

    ``pause(secs)`` is called between batches and returns True to stop early (a stop flag's
    wait); by default the pass sleeps."""
    cutoff = now_ms() - int(days * DAY_MS)
    deleted = 0
    while True:
        started = time.monotonic()
        n = st.delete_before(cutoff, batch_rows)
        deleted += n
        if n == 0:
            return deleted, cutoff
        rest = max(time.monotonic() - started, 0.005)
        if pause is not None:
            if pause(rest):
                return deleted, cutoff
        else:
            time.sleep(rest)


def run(open_st: Callable[[], HubStorage], days: float, stop: StopFlag, interval: float) -> None:
    """Prune every ``interval`` seconds until ``stop`` (or the parent process is gone)."""
    parent = os.getppid()
    st = open_st()
    try:
        while not stop.is_set():
            deleted, cutoff = prune(st, days, pause=lambda secs: stop.wait(secs) or _orphan(parent))
            if deleted:
                log.info(
                    "retention: deleted %d readings older than %s (%g days)",
                    deleted,
                    iso_utc(cutoff),
                    days,
                )
            waited = 0.0
            while waited < interval and not stop.wait(min(5.0, interval - waited)):
                if _orphan(parent):
                    return
                waited += 5.0
    finally:
        st.close()


def _orphan(parent: int) -> bool:
    """The hub that started this process is gone (even by SIGKILL)."""
    return os.getppid() != parent


def main(argv: list[str] | None = None) -> int:
    """``python -m fieldgate.hub.retention --db DB --days N`` (started by ``hub serve``)."""
    from fieldgate.hub.backends import open_storage

    ap = argparse.ArgumentParser(prog="fieldgate-hub-retention")
    ap.add_argument("--db", required=True)
    ap.add_argument("--days", type=float, required=True)
    ap.add_argument("--db-password-file")
    ap.add_argument("--interval-secs", type=float, default=INTERVAL_SECS)
    args = ap.parse_args(argv)
    setup_logging("INFO")
    stop = StopFlag().install()
    try:
        run(
            lambda: open_storage(args.db, create=False, password_file=args.db_password_file),
            args.days,
            stop,
            args.interval_secs,
        )
    except FieldgateError as exc:
        log.error("retention stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
