"""Log records to the systemd journal over journald's native protocol.

With ``log.journal: true`` every command that reads the configuration sends its log records
to the journal as well as to stderr (which supervisor keeps in its rotated files), each with
``SYSLOG_IDENTIFIER=fieldgate-<command>`` (``journalctl -t fieldgate-collect``), the
syslog ``PRIORITY`` of its level, the logger's name and the code location.

The protocol (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/) is one datagram per entry on an
``AF_UNIX``/``SOCK_DGRAM`` socket: ``KEY=value`` lines, or for a value holding a newline
``KEY``, a newline, the value's length as a little-endian 64-bit integer, the value and a
newline. It needs no library (Debian's ``python3-systemd`` lives outside the glue's
virtualenv; PyPI's ``systemd-python`` has no wheels and needs a compiler and libsystemd's
headers on the gateway), and unlike ``systemd-cat`` in front of a daemon it keeps stderr
for supervisor and puts no pipe between the daemon and its stop signal.

Sending never blocks: the socket is non-blocking, and an entry journald cannot take (not
running, its queue full) is dropped from the journal only; stderr still has it. The first
drop after a success says so once on stderr.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"

#: The journal keeps at most this much of one message (a datagram must fit the socket's
#: send buffer; the whole message is still in supervisor's file).
MESSAGE_MAX_BYTES = 48 * 1024

#: syslog priorities of the logging levels (debug 7 ... critical 2).
PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

#: syslog facility "daemon"
FACILITY_DAEMON = 3


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between two take the lower one's)."""
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


def encode(fields: dict[str, str]) -> bytes:
    """One journal entry in the native protocol's datagram format."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode("ascii") + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode("ascii") + b"=" + data + b"\n"
    return bytes(out)


def truncate(text: str, limit: int = MESSAGE_MAX_BYTES) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore") + " [truncated in the journal]"


class JournalHandler(logging.Handler):
    """A logging handler that sends each record to journald as one entry."""

    def __init__(self, identifier: str, socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.socket_path = socket_path
        self.sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        self.dropped = 0
        self._reported = False
        self.setFormatter(logging.Formatter("%(message)s"))

    def entry(self, record: logging.LogRecord) -> bytes:
        return encode(
            {
                "MESSAGE": truncate(self.format(record)),
                "PRIORITY": str(priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "SYSLOG_FACILITY": str(FACILITY_DAEMON),
                "FIELDGATE_LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName or "",
            }
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.entry(record)
        except Exception:  # a record that cannot be formatted: logging's own report
            self.handleError(record)
            return
        try:
            self.sock.sendto(data, self.socket_path)
        except OSError as exc:
            self.dropped += 1
            if not self._reported:
                self._reported = True
                sys.stderr.write(
                    f"fieldgate: journal: cannot send to {self.socket_path} "
                    f"({exc.strerror or exc}); log lines go to stderr only until it takes "
                    "them again\n"
                )
            return
        self._reported = False

    def close(self) -> None:
        self.sock.close()
        super().close()
