"""What every long-running command shares: logging that supervisor captures (and, when
configured, the journal), clean stop."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from fieldgate.journal import JOURNAL_SOCKET, JournalHandler
from fieldgate.redact import RedactingFilter

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    level: str = "INFO", *, journal: str | None = None, journal_socket: str = JOURNAL_SOCKET
) -> None:
    """Log lines to stderr (supervisor captures and rotates them) and, with ``journal`` (a
    SYSLOG_IDENTIFIER such as ``fieldgate-collect``), to the systemd journal as well."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    if journal:
        root.addHandler(JournalHandler(journal, journal_socket))
    for h in root.handlers:
        h.addFilter(RedactingFilter())  # credentials never reach a log line
    root.setLevel(level)
    # paho and urllib3 are chatty at DEBUG; keep them at WARNING unless asked.
    for noisy in ("urllib3", "paho"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class StopFlag:
    """Set by SIGTERM or SIGINT; long-running loops poll it or wait on it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> StopFlag:
        """Handle SIGTERM and SIGINT in the main thread by setting the flag."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds; True as soon as a stop was asked for."""
        return self._event.wait(timeout)
