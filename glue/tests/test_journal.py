"""Logging to the systemd journal: journald's native protocol, spoken to a real datagram
socket that reads it as journald does (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/)."""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ConfigFactory, run_fieldgate

from fieldgate import journal


def parse_entry(data: bytes) -> dict[str, str]:
    """A native-protocol datagram as journald reads it: KEY=value lines, or KEY, newline,
    a little-endian 64-bit length, the value and a newline."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[key.decode("ascii")] = value.decode("utf-8")
    return fields


class Journal:
    """A datagram socket standing where journald's is; ``entries()`` reads what arrived."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 108 bytes: a short directory of our own
        self.dir = Path(tempfile.mkdtemp(prefix="fgj-", dir="/tmp"))
        self.path = self.dir / "socket"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    def entries(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                out.append(parse_entry(self.sock.recv(1 << 20)))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir)


@pytest.fixture
def fake_journald() -> Iterator[Journal]:
    j = Journal()
    yield j
    j.close()


def test_a_command_logs_to_the_journal_as_fieldgate_command_and_to_stderr(
    config_file: ConfigFactory, fake_journald: Journal
) -> None:
    config = config_file(
        overrides={
            "upload": {"mode": "PASS"},
            "log": {"journal": True, "journal_socket": str(fake_journald.path)},
        }
    )
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    entries = fake_journald.entries()
    assert entries, "nothing reached the journal socket"
    assert {e["SYSLOG_IDENTIFIER"] for e in entries} == {"fieldgate-upload"}
    done = [e for e in entries if e["MESSAGE"] == "upload --once: nothing left to send"]
    assert len(done) == 1
    assert done[0]["PRIORITY"] == "6"
    assert done[0]["FIELDGATE_LOGGER"] == "fieldgate.uploader"
    assert done[0]["CODE_FILE"].endswith("uploader.py")
    # supervisor's file (stderr) still gets every line
    assert "upload --once: nothing left to send" in r.stderr


def test_without_the_switch_nothing_goes_to_the_journal(
    config_file: ConfigFactory, fake_journald: Journal
) -> None:
    config = config_file(
        overrides={"upload": {"mode": "PASS"}, "log": {"journal_socket": str(fake_journald.path)}}
    )
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert fake_journald.entries() == []


def test_no_journald_is_said_once_and_the_command_still_works(
    config_file: ConfigFactory, tmp_path: Path
) -> None:
    config = config_file(
        overrides={
            "upload": {"mode": "PASS"},
            "log": {"journal": True, "journal_socket": str(tmp_path / "no-such-socket")},
        }
    )
    r = run_fieldgate("upload", "--once", config=config)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("fieldgate: journal: cannot send to") == 1
    assert "upload --once: nothing left to send" in r.stderr


def test_multi_line_messages_are_binary_safe_and_levels_map_to_priorities(
    fake_journald: Journal,
) -> None:
    handler = journal.JournalHandler("fieldgate-test", str(fake_journald.path))
    logger = logging.getLogger("fieldgate.test.journal")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("d")
        logger.warning("line one\nline two=with an equals sign")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        logger.critical("x" * (journal.MESSAGE_MAX_BYTES + 100))
    finally:
        logger.removeHandler(handler)
        handler.close()
    debug, warning, error, critical = fake_journald.entries()
    assert (debug["PRIORITY"], debug["MESSAGE"]) == ("7", "d")
    assert warning["PRIORITY"] == "4"
    assert warning["MESSAGE"] == "line one\nline two=with an equals sign"
    assert error["PRIORITY"] == "3"
    assert error["MESSAGE"].startswith("failed\nTraceback")
    assert error["MESSAGE"].endswith("ValueError: boom")
    assert critical["PRIORITY"] == "2"
    assert critical["MESSAGE"].endswith(" [truncated in the journal]")
    assert len(critical["MESSAGE"]) < journal.MESSAGE_MAX_BYTES + 100
    assert {e["SYSLOG_FACILITY"] for e in (debug, warning, error, critical)} == {"3"}


def test_a_full_journal_queue_drops_entries_instead_of_blocking(fake_journald: Journal) -> None:
    handler = journal.JournalHandler("fieldgate-test", str(fake_journald.path))
    fake_journald.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    record = logging.LogRecord(
        "fieldgate.test", logging.INFO, __file__, 1, "y" * 2000, None, None, func="test"
    )
    try:
        for _ in range(20_000):  # nobody reads: the socket's queue fills up
            handler.emit(record)
    finally:
        handler.close()
    assert handler.dropped > 0
    assert 0 < len(fake_journald.entries()) < 20_000
