"""Test support shared by every test module: a real Mosquitto broker, real config and
secret files, the real CLI. Fixtures are registered in conftest.py; helpers are imported
from here (``from support import publish``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pgserver
import pytest
import yaml

FIELDGATE = str(Path(sys.executable).with_name("fieldgate"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

COLLECTOR_USER = "collector"
COLLECTOR_PASSWORD = "collector-secret"
SENSOR_USER = "sensor"
SENSOR_PASSWORD = "sensor-secret"
#: The persistence lines of the mosquitto role when the fieldgate plugin is loaded: no autosave
#: of Mosquitto's own; the plugin asks for a save within 0.5 s of a message
#: (docs/broker-persistence.md).
DEPLOYED_AUTOSAVE = "autosave_interval 0\n"


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


@cache
def broker_conf() -> str:
    """What ``fieldgate broker-conf`` prints (CONTRACT §9): every test broker adds it.

    Built once per test run into the default cache directory (``$FIELDGATE_CACHE_DIR``).
    """
    p = subprocess.run(
        [FIELDGATE, "broker-conf"], capture_output=True, text=True, check=False, timeout=120
    )
    if p.returncode != 0:
        raise RuntimeError(f"fieldgate broker-conf failed: {p.stderr.strip()}")
    return p.stdout


@dataclass
class Broker:
    """A real Mosquitto on a free loopback port with a password file and persistence.

    ``stamp`` (default) loads what ``fieldgate broker-conf`` prints, as gateways do; ``env``
    is added to mosquitto's environment. ``autosave`` holds the persistence lines (default: a
    save after every change; :data:`DEPLOYED_AUTOSAVE` is what the mosquitto role writes when
    the plugin is loaded). ``device_listener`` adds a second loopback listener on
    ``device_port`` as the role writes device listeners (the client id is the account name),
    while ``port`` stays the collector's listener.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    extra_conf: str = ""
    stamp: bool = True
    env: dict[str, str] = field(default_factory=dict)
    autosave: str = "autosave_on_changes true\nautosave_interval 1\n"
    device_listener: bool = False
    device_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.passwd = self.workdir / "passwd"
        self.passwd.write_text("")
        for user, pw in ((COLLECTOR_USER, COLLECTOR_PASSWORD), (SENSOR_USER, SENSOR_PASSWORD)):
            subprocess.run([MOSQUITTO_PASSWD, "-b", str(self.passwd), user, pw], check=True)
        self.passwd.chmod(0o600)
        self.log = self.workdir / "mosquitto.log"

    def write_conf(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {self.passwd}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n" + self.autosave + "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 20\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # as root, mosquitto would drop to user mosquitto, who cannot read pytest's tmp
            + ("user root\n" if os.geteuid() == 0 else "")
            + (broker_conf() if self.stamp else "")
            + self.extra_conf
            + (
                f"listener {self.device_port} {self.host}\nuse_username_as_clientid true\n"
                if self.device_listener
                else ""
            )
        )
        return conf

    def start(self) -> None:
        conf = self.write_conf()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **self.env},
        )
        try:
            wait_for_port(self.host, self.port)
            if self.device_listener:
                wait_for_port(self.host, self.device_port)
        except TimeoutError:
            self.proc.kill()
            err = self.proc.communicate()[1].decode(errors="replace")
            raise RuntimeError(f"mosquitto did not start: {err}") from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh broker per test (Debian's mosquitto; starting one takes milliseconds)."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


def publish(
    broker: Broker,
    messages: Sequence[tuple[str, bytes | str]],
    *,
    qos: int = 1,
    username: str = SENSOR_USER,
    password: str = SENSOR_PASSWORD,
    client_id: str = "",
    port: int | None = None,
) -> None:
    """Publish (topic, payload) pairs at ``qos`` and wait until the broker has every one
    (on ``port``, default the broker's first listener)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.username_pw_set(username, password)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect(broker.host, port or broker.port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=qos) for t, p in messages]
        for info in infos:
            info.wait_for_publish(timeout=60)
            if not info.is_published():
                raise RuntimeError("a message was not acknowledged by the broker")
    finally:
        client.disconnect()
        client.loop_stop()


def publish_denied(
    broker: Broker,
    messages: Sequence[tuple[str, bytes | str]],
    *,
    username: str = SENSOR_USER,
    password: str = SENSOR_PASSWORD,
    port: int | None = None,
) -> None:
    """Publish each (topic, payload) at QoS 1 on a connection of its own and never send it
    again. Mosquitto 2.0.11 (Debian 12) acknowledges a PUBLISH its ACL denies and then closes
    the connection; paho's background loop would reconnect and resend a message whose
    acknowledgement it had not read yet, and the broker would see (and the plugin count) that
    message twice."""
    for topic, payload in messages:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.username_pw_set(username, password)
        client.connect(broker.host, port or broker.port)
        info = client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 60
        # the acknowledgement, or the broker closing the connection, ends it
        while not info.is_published() and client.loop(timeout=0.1) == mqtt.MQTT_ERR_SUCCESS:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer from the broker to a PUBLISH on {topic!r}")
        client.disconnect()


def v311_session(broker: Broker, client_id: str, topic: str) -> None:
    """Leave a persistent MQTT 3.1.1 session (clean session off) subscribed to ``topic`` at
    QoS 1 on the broker, as the collector of earlier versions did."""
    import threading

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.username_pw_set(COLLECTOR_USER, COLLECTOR_PASSWORD)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        assert subscribed.wait(10), "no SUBACK"
    finally:
        client.disconnect()
        client.loop_stop()


def reading_payload(ts_ms: int, **metrics: float) -> str:
    """A docs/contract.md §4 JSON payload."""
    return json.dumps({"ts": ts_ms, "metrics": metrics})


def _deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


ConfigFactory = Callable[..., Path]


@pytest.fixture
def config_file(tmp_path: Path) -> ConfigFactory:
    """Write a complete gateway config (and its secret files) under tmp; returns its path.

    ``config_file(broker=mosquitto, overrides={...})`` deep-merges ``overrides`` into the
    defaults; pass ``name=`` to write several configs in one test.
    """

    def make(
        *,
        broker: Broker | None = None,
        overrides: dict[str, Any] | None = None,
        name: str = "fieldgate.yaml",
        serial: str = "GW-TEST",
    ) -> Path:
        root = tmp_path / "gw"
        secrets = root / "secrets"
        secrets.mkdir(parents=True, exist_ok=True)
        (root / "var").mkdir(exist_ok=True)
        for fname, content in (
            ("mqtt_password", COLLECTOR_PASSWORD),
            ("gateway_key", "not-registered-yet"),
            ("export_password", "open-sesame"),
        ):
            p = secrets / fname
            if not p.exists():
                p.write_text(content + "\n")
                p.chmod(0o600)
        led = root / "led"
        led.mkdir(exist_ok=True)
        for attr, value in (
            ("brightness", "0"),
            ("max_brightness", "1"),
            ("trigger", "[none] timer"),
            ("delay_on", "0"),
            ("delay_off", "0"),
        ):
            if not (led / attr).exists():
                (led / attr).write_text(value + "\n")
        cfg: dict[str, Any] = {
            "site": {"serial": serial},
            "store": {"path": str(root / "var" / "data_store.db")},
            "mqtt": {
                "host": broker.host if broker else "127.0.0.1",
                "port": broker.port if broker else 1883,
                "username": COLLECTOR_USER,
                "password_file": str(secrets / "mqtt_password"),
                "topic_prefix": "fieldgate",
                "client_id": f"fieldgate-collector-{os.getpid()}-{id(root) % 10000}",
                "commit_max_ms": 100,
            },
            "devices": {
                "allow_unknown": False,
                "list": [
                    {"serial": "TH-001", "alias": "roof-temp"},
                    {"serial": "TH-002"},
                    {
                        "serial": "CSV-001",
                        "format": "csv",
                        "csv_columns": ["ts", "temperature", "humidity"],
                    },
                ],
            },
            "upload": {
                "url": "http://127.0.0.1:9",
                "key_file": str(secrets / "gateway_key"),
                "interval_secs": 1,
                "pending_dir": str(root / "var" / "batches" / "pending"),
                "uploaded_dir": str(root / "var" / "batches" / "uploaded"),
                "retry_initial_secs": 0.05,
                "retry_max_secs": 0.5,
            },
            "export": {
                "password_file": str(secrets / "export_password"),
                "led_path": str(led),
                "log_file": str(root / "log" / "usb_exporter.log"),
                "spool_dir": str(root / "run" / "usb-events"),
                "mount_dir": str(root / "run" / "usb-mounts"),
            },
            "disk": {"stop_accepting_at_percent": 98, "check_interval_secs": 0.5},
            "log": {"level": "INFO"},
        }
        _deep_update(cfg, overrides or {})
        path = root / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_fieldgate(
    *args: str,
    config: Path | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> Result:
    """Run the real ``fieldgate`` console script (``stdin`` on its standard input) and capture
    its output."""
    full_env = {**os.environ, **(env or {})}
    if config is not None:
        full_env["FIELDGATE_CONFIG"] = str(config)
    p = subprocess.run(
        [FIELDGATE, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
    return Result(p.returncode, p.stdout, p.stderr)


def start_fieldgate(*args: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start a long-running ``fieldgate`` command with its output in ``log``."""
    env = {**os.environ, "FIELDGATE_CONFIG": str(config)}
    with log.open("ab") as out:
        return subprocess.Popen([FIELDGATE, *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15
) -> int:
    """Signal a process and wait for it; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 60,
    interval: float = 0.1,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until it is true; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def count_rows(db: Path, table: str, where: str = "1") -> int:
    """Rows in a table of a real SQLite file (0 if the file does not exist yet)."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()[0])  # noqa: S608
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def batch_of_each_reading(conn: Any) -> list[str | None]:
    """For each stored reading in id order, the batch whose id range holds it (None for
    none; several ranges holding one reading would show joined with commas)."""
    return [
        b
        for (b,) in conn.execute(
            "SELECT (SELECT group_concat(b.batch_id) FROM batches b "
            "WHERE r.id BETWEEN b.first_id AND b.last_id) FROM readings r ORDER BY r.id"
        )
    ]


def record_batch(conn: Any, batch_id: str, state: str = "uploaded") -> int:
    """Make every unbatched reading one batch's, as a cut (and an upload) would: a
    ``batches`` row over their id range. Commits; how many readings it took."""
    from fieldgate import membership

    first, last, n = conn.execute(
        f"SELECT MIN(id), MAX(id), COUNT(*) FROM readings WHERE {membership.UNBATCHED}"  # noqa: S608
    ).fetchone()
    conn.execute(
        "INSERT INTO batches (batch_id, state, rows, sha256, first_id, last_id, mode, type, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, 'LIVE', 'readings', 0)",
        (batch_id, state, n, "0" * 64, first, last),
    )
    conn.commit()
    return int(n)


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query on a real SQLite file (read while daemons write it)."""
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def store_path(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["store"]["path"])


def state(db: Path, key: str = "collector.state") -> str | None:
    if not db.exists():
        return None
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return row[0] if row else None


class Collector:
    """A running ``fieldgate collect`` process, stopped (SIGTERM) at the end of the test."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.db = store_path(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_running: bool = True) -> None:
        self.proc = start_fieldgate("collect", config=self.config, log=self.log)
        if wait_running:
            wait_until(
                lambda: state(self.db) == "running" or self.proc.poll() is not None,
                timeout=30,
                what="collector running",
            )
            assert self.proc.poll() is None, self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        rc = stop_process(self.proc, sig)
        self.proc = None
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def readings(self) -> int:
        return count_rows(self.db, "readings")

    def subscribed(self) -> None:
        """Wait until the broker granted every subscription (recorded in the store)."""
        wait_until(
            lambda: state(self.db, "collector.subscriptions") is not None,
            timeout=30,
            what="the collector's subscriptions",
        )


@dataclass
class Hub:
    """A real ``fieldgate hub serve`` (gunicorn) on a free loopback port, its own database.

    ``db`` is the ``--db`` value: a SQLite file (default ``workdir/hub.db``) or a
    PostgreSQL URL (the ``hub_db`` fixture gives both, see pgserver.py). ``stop()`` and
    ``start()`` keep the port and the database, so a test can take the hub away and bring
    it back; ``extra_args`` are passed to ``hub serve``.
    """

    workdir: Path
    db: str = ""
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    workers: int = 2
    extra_args: list[str] = field(default_factory=list)
    #: Run ``hub serve`` through this (``prlimit --as=N --``: a memory cap) with ``env``.
    prefix: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db = self.db or str(self.workdir / "hub.db")
        self.log = self.workdir / "hub.log"

    @property
    def postgresql(self) -> bool:
        return self.db.startswith("postgresql://")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    FIELDGATE,
                    "hub",
                    "serve",
                    "--db",
                    self.db,
                    "--listen",
                    f"{self.host}:{self.port}",
                    "--workers",
                    str(self.workers),
                    *self.extra_args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if self.env is None else {**os.environ, **self.env},
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                wait_for_port(self.host, self.port, timeout=0.5)
                return
            except TimeoutError:
                if self.proc.poll() is None and time.monotonic() < deadline:
                    continue
            self.stop()
            raise RuntimeError(f"the hub did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cli(self, *args: str, stdin: str | None = None) -> Result:
        """``fieldgate hub <args> --db <this hub's database>``."""
        return run_fieldgate("hub", *args, "--db", self.db, stdin=stdin)

    def pin(self, serial: str, *extra: str) -> str:
        """A one-time PIN from ``fieldgate hub pin``."""
        r = self.cli("pin", "--serial", serial, *extra)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def register(self, config: Path) -> None:
        """Register the gateway of ``config`` (``fieldgate register`` with a fresh PIN)."""
        serial = yaml.safe_load(config.read_text())["site"]["serial"]
        r = run_fieldgate("register", "--pin", self.pin(serial), config=config)
        assert r.returncode == 0, r.stderr

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query (``?`` placeholders) on the hub's database, read while it runs."""
        return query_db(self.db, sql, params)

    def readings(self, serial: str) -> int:
        return int(self.query("SELECT COUNT(*) FROM readings WHERE serial = ?", (serial,))[0][0])

    def dump(self) -> str:
        """Everything the database holds, as text (to show a secret is not in it)."""
        if self.postgresql:
            pg_dump = "/usr/lib/postgresql/15/bin/pg_dump"
            return subprocess.run(
                [pg_dump, "--data-only", self.db], capture_output=True, text=True, check=True
            ).stdout
        return "".join(
            p.read_bytes().decode("latin-1")
            for p in Path(self.db).parent.glob(Path(self.db).name + "*")
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def query_db(db: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query (``?`` placeholders) on a hub database of either backend."""
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description is not None else []
    import sqlite3

    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def make_user(
    db: str,
    name: str,
    domains: Sequence[str] = (),
    *,
    admin: bool = False,
    password: str | None = None,
) -> tuple[str, str]:
    """A user in the hub's database; its (name, password) for ``requests``' ``auth=``.

    The hash is a real scrypt hash with a lower cost (N=2^10) than ``hub user add`` gives
    (the cost is stored with each hash, and checked the same way), so that tests do not
    spend a second per login; ``hub user add`` itself is tested with the real cost."""
    from fieldgate.hub.backends import open_storage
    from fieldgate.hub.passwords import hash_password

    password = password or f"{name}-secret-pw"
    st = open_storage(db)
    try:
        assert st.add_user(name, hash_password(password, n=2**10), domains, admin=admin)
    finally:
        st.close()
    return name, password


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.PgServer]:
    """One real PostgreSQL server for the whole session (Debian's postgresql 15)."""
    if not pgserver.available():
        pytest.fail("PostgreSQL 15 is not installed: run scripts/bootstrap.sh")
    server = pgserver.start()
    # every hub and fieldgate command the tests start finds the password where libpq looks
    os.environ["PGPASSWORD"] = pgserver.PASSWORD
    try:
        yield server
    finally:
        os.environ.pop("PGPASSWORD", None)
        server.stop()


BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def hub_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty hub database of each backend: a SQLite path, or a PostgreSQL URL of
    a new database on the session's server."""
    if request.param == "sqlite":
        (tmp_path / "hub").mkdir(exist_ok=True)
        yield str(tmp_path / "hub" / "hub.db")
        return
    server: pgserver.PgServer = request.getfixturevalue("pg_server")
    name = server.new_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


@pytest.fixture
def hub(hub_db: str, tmp_path: Path) -> Iterator[Hub]:
    """A fresh hub per test, once per backend; more with ``Hub(tmp_path / "other", hub_db)``
    (stop them yourself)."""
    h = Hub(tmp_path / "hub", hub_db)
    h.start()
    yield h
    h.stop()
