"""A real PostgreSQL server for the tests: Debian's ``postgresql`` 15, ``initdb`` into a
temporary directory, on a free loopback port and a Unix socket directory of its own.

One server per test session (:func:`start`); each test gets a fresh database from
:meth:`PgServer.new_database` (``CREATE DATABASE … TEMPLATE template0`` takes a few tens of
milliseconds). The server runs as the ``postgres`` system user when the tests run as root
(PostgreSQL refuses to run as root) and as the current user otherwise. It is tuned for
tests (no fsync): the tests kill the hub, never PostgreSQL. The benchmark starts its own,
durable one with the same helper (``durable=True``).

A killed test run does no teardown, so each server has a watchdog: a shell in a session of
its own that waits for the process that started the server and, once it is gone, stops the
server and removes its directory (``stop()`` ends the watchdog first).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: The superuser the tests' hubs connect as (password authentication over TCP).
USER = "fieldgate"
PASSWORD = "pg-test-secret"


def available() -> bool:
    """Whether Debian's PostgreSQL 15 server is installed (scripts/bootstrap.sh does it)."""
    return (PG_BIN / "initdb").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    root: Path
    port: int = field(default_factory=_free_port)
    durable: bool = False
    proc: subprocess.Popen[bytes] | None = None
    watchdog: subprocess.Popen[bytes] | None = None
    _names: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            for p in (self.root, self.socket_dir, pwfile):
                os.chown(p, pg.pw_uid, pg.pw_gid)
        subprocess.run(
            [
                *self._as_owner(),
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "logging_collector": "off",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        log = (self.root / "postgres.log").open("ab")
        self.proc = subprocess.Popen(
            [*self._as_owner(), str(PG_BIN / "postgres"), "-D", str(self.data)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres did not start: {self.log_tail()}")
            ok = subprocess.run(
                [
                    str(PG_BIN / "pg_isready"),
                    "-q",
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                ],
                check=False,
            )
            if ok.returncode == 0:
                self._watch(os.getpid())
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not answer in 30 s: {self.log_tail()}")

    def _watch(self, owner: int) -> None:
        """Stop the server and remove its directory once process ``owner`` has ended."""
        assert self.proc is not None
        script = (
            'tail --pid="$1" -f /dev/null; kill -INT -- "-$2" 2>/dev/null; '
            'for _ in $(seq 100); do kill -0 -- "-$2" 2>/dev/null || break; sleep 0.1; done; '
            'kill -KILL -- "-$2" 2>/dev/null; rm -rf -- "$3"'
        )
        self.watchdog = subprocess.Popen(
            ["sh", "-c", script, "pg-watchdog", str(owner), str(self.proc.pid), str(self.root)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def log_tail(self) -> str:
        log = self.root / "postgres.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def url(self, dbname: str) -> str:
        """The hub's ``--db`` for a database of this server (the password comes from
        ``PGPASSWORD`` or ``--db-password-file``, never the URL)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user={USER} dbname={dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through ``psql`` on the Unix socket (trust); returns its output."""
        r = subprocess.run(
            [
                "psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                USER,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr.strip()}")
        return r.stdout

    def new_database(self, prefix: str = "hub") -> str:
        """A fresh, empty database; returns its name."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.watchdog is not None:
            os.killpg(self.watchdog.pid, signal.SIGKILL)
            self.watchdog.wait()
            self.watchdog = None
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT: PostgreSQL's fast shutdown (disconnect clients, checkpoint, exit)
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


def start(*, durable: bool = False) -> PgServer:
    """A running server in a new temporary directory (outside pytest's root-only tmp)."""
    root = Path(tempfile.mkdtemp(prefix="fieldgate-pg-"))
    root.chmod(0o755)  # the postgres user needs to enter it
    server = PgServer(root, durable=durable)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
