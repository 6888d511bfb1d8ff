#!/usr/bin/python3
"""A stand-in network UPS: answers apcupsd's network information server (NIS) protocol.

Runs on a test host (Python's standard library only: the host gets no packages) and plays
the UPS that a gateway's apcupsd reads with `UPSTYPE net` / `DEVICE host:3551`: the role an
apcupsd "master" with the real UPS on its USB or serial port plays at a site. What it is
told to report (mains, battery, low battery) is kept in a state file, so a test switches
the power off and on with `ups_standin.py set onbatt|online` while apcupsd keeps polling.

The protocol, as apcupsd 3.14.14 speaks it (src/lib/apclibnis.c, src/apcnis.c,
src/lib/apcstatus.c, src/drivers/net/net.c):
- TCP; every message in either direction is a 2-byte big-endian length and that many
  bytes; a message of length 0 ends a reply. A connection may carry several commands.
- Commands: `status` (one message per line of `apcaccess status`, then the empty message)
  and `events` (the events file; here: none). Anything else: `Invalid command`.
- Each status line is `KEYWORD  : value` with the keyword padded to 9 characters, so a
  value starts at column 11 (the net driver skips 11 characters for text fields and takes
  the third word for numbers: `sscanf("%*s %*s %s")`, after `strstr` finds the keyword).
- The net driver (apcupsd as a NIS client) connects anew for every poll, sends `status`,
  and reads only a few fields: STATFLAG (the status bits, parsed with strtol), and for its
  capabilities and thresholds LINEV, LOADPCT, BCHARGE, TIMELEFT, LASTXFER, SELFTEST, UPSNAME,
  MODEL, UPSMODE, SERIALNO, BATTDATE, FIRMWARE, ...; a field it does not find is a
  capability the UPS lacks. It polls every POLLTIME seconds (60 by default) on mains, every
  second once on battery (or when STATFLAG lacks the battery-present bit), at most once per
  2 s (fill_status_buffer).
- What the gateway's apcupsd then decides from STATFLAG: the on-battery bit (0x10) is a
  power failure (event `powerout`); still on battery after ONBATTERYDELAY seconds is
  `onbattery`; TIMEOUT seconds after that, `timeout` and the shutdown (`doshutdown`). The
  battery-low bit (0x40) while on battery is `failing` and a shutdown 5 s later; BCHARGE at
  or below BATTERYLEVEL or TIMELEFT at or below MINUTES shut down as well (`loadlimit`,
  `runlimit`). A master that cannot be reached while on battery: shutdown on the 5th failed
  poll (`remotedown`); on mains: `commfailure`, and nothing else.

  ups_standin.py serve [--listen ADDR] [--port 3551] [--state-file F]   the server
  ups_standin.py set online|onbatt|lowbatt [--state-file F]            switch the power
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import struct
import sys
import time
from pathlib import Path

DEFAULT_STATE_FILE = Path("/run/fieldgate-ups-standin/state")
DEFAULT_PORT = 3551
# Status bits of STATFLAG (apcupsd include/defines.h).
UPS_ONLINE = 0x00000008
UPS_ONBATT = 0x00000010
UPS_BATTLOW = 0x00000040
UPS_PLUGGED = 0x01000000  # "computer plugged into the UPS": a master's local bit
UPS_BATTPRESENT = 0x04000000
# What each state reports: STATFLAG, STATUS words, line volts, battery percent, minutes left.
STATES = {
    "online": (UPS_ONLINE, "ONLINE", 230.0, 100.0, 45.0),
    "onbatt": (UPS_ONBATT, "ONBATT", 0.0, 95.0, 40.0),
    "lowbatt": (UPS_ONBATT | UPS_BATTLOW, "ONBATT LOWBATT", 0.0, 8.0, 3.0),
}
# Longest command accepted (apcupsd's own server reads at most MAXSTRING = 256 bytes).
MAX_COMMAND = 256
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"


def read_state(path: Path) -> tuple[str, float]:
    """The state the stand-in reports and since when (mains when the file is missing)."""
    try:
        name = path.read_text().strip()
        since = path.stat().st_mtime
    except FileNotFoundError:
        return "online", 0.0
    if name not in STATES:
        raise ValueError(f"{path}: unknown state {name!r} (one of {', '.join(STATES)})")
    return name, since


def write_state(path: Path, name: str) -> None:
    """Switch the reported state atomically (a poll sees the old or the new state)."""
    if name not in STATES:
        raise ValueError(f"unknown state {name!r} (one of {', '.join(STATES)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(name + "\n")
    tmp.rename(path)


def statflag(state: str) -> int:
    """STATFLAG of a state, with the bits a real master sets besides (plugged, battery)."""
    return STATES[state][0] | UPS_PLUGGED | UPS_BATTPRESENT


def status_lines(state: str, since: float, started: float, hostname: str) -> list[str]:
    """The reply to `status`, line by line, in the order and format of apcupsd's own."""
    flags, words, linev, bcharge, timeleft = STATES[state]
    now = time.time()
    on_batt = flags & UPS_ONBATT
    fmt = lambda t: time.strftime(DATE_FORMAT, time.localtime(t))  # noqa: E731
    fields = [
        ("DATE", fmt(now)),
        ("HOSTNAME", hostname),
        ("VERSION", "3.14.14 (31 May 2016) fieldgate-ups-standin"),
        ("UPSNAME", "standin-ups"),
        ("CABLE", "USB Cable"),
        ("DRIVER", "USB UPS Driver"),
        ("UPSMODE", "Stand Alone"),
        ("STARTTIME", fmt(started)),
        ("MODEL", "Fieldgate stand-in UPS"),
        ("STATUS", words),
        ("LINEV", f"{linev:.1f} Volts"),
        ("LOADPCT", "12.0 Percent"),
        ("BCHARGE", f"{bcharge:.1f} Percent"),
        ("TIMELEFT", f"{timeleft:.1f} Minutes"),
        ("MBATTCHG", "5 Percent"),
        ("MINTIMEL", "3 Minutes"),
        ("MAXTIME", "0 Seconds"),
        ("LASTXFER", "Low line voltage" if on_batt else "No transfers since turnon"),
        ("NUMXFERS", "1" if on_batt else "0"),
        ("TONBATT", f"{int(now - since) if on_batt else 0} Seconds"),
        ("SELFTEST", "NO"),
        ("STATFLAG", f"0x{statflag(state):08X}"),
        ("SERIALNO", "FG0000STANDIN"),
        ("BATTDATE", "2024-01-01"),
        ("FIRMWARE", "standin"),
        ("END APC", fmt(now)),
    ]
    lines = [f"{key:<9}: {value}\n" for key, value in fields]
    header = f"APC      : 001,{len(lines):03d},{sum(len(x) for x in lines):04d}\n"
    return [header, *lines]


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _send(sock: socket.socket, text: str) -> None:
    data = text.encode()
    sock.sendall(struct.pack("!H", len(data)) + data)


class NisHandler(socketserver.BaseRequestHandler):
    """One client connection: commands until the client closes it."""

    server: NisServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(15)  # apcupsd's own read timeout
        peer = self.client_address[0]
        try:
            while True:
                head = _recv_exact(sock, 2)
                if head is None:
                    return
                (length,) = struct.unpack("!H", head)
                if length == 0 or length > MAX_COMMAND:
                    log(f"{peer}: refused a command of {length} bytes")
                    return
                command = _recv_exact(sock, length)
                if command is None:
                    return
                self.answer(sock, peer, command.rstrip(b"\0\n").decode("ascii", "replace"))
        except (TimeoutError, OSError) as exc:
            log(f"{peer}: connection ended: {exc}")

    def answer(self, sock: socket.socket, peer: str, command: str) -> None:
        if command == "status":
            state, since = read_state(self.server.state_file)
            lines = status_lines(state, since, self.server.started, socket.gethostname())
            for line in lines:
                _send(sock, line)
            log(f"status to {peer}: {STATES[state][1]} (STATFLAG 0x{statflag(state):08X})")
        elif command == "events":
            _send(sock, "No events\n")
        else:
            _send(sock, "Invalid command\n")
        sock.sendall(b"\0\0")


class NisServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state_file: Path) -> None:
        super().__init__(address, NisHandler)
        self.state_file = state_file
        self.started = time.time()


def log(msg: str) -> None:
    print(f"ups-standin: {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-file", type=Path, default=DEFAULT_STATE_FILE)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer NIS requests")
    s.add_argument("--listen", default="0.0.0.0")  # noqa: S104 - a UPS on the test network
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    st = sub.add_parser("set", help="switch what the UPS reports")
    st.add_argument("state", choices=sorted(STATES))
    a = p.parse_args(argv)
    if a.cmd == "set":
        write_state(a.state_file, a.state)
        log(f"now {a.state}")
        return 0
    read_state(a.state_file)  # refuse a broken state file before serving
    with NisServer((a.listen, a.port), a.state_file) as server:
        log(f"serving apcupsd NIS on {a.listen}:{a.port}, state from {a.state_file}")
        server.serve_forever()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"ups-standin: error: {exc}", file=sys.stderr)
        sys.exit(1)
