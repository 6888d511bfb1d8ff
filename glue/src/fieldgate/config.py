"""The gateway's configuration: one YAML file, validated completely before anything starts.

Every section is a frozen dataclass; the dataclass fields *are* the schema. Unknown keys,
wrong types, values out of range and missing required keys are refused with one sentence
that names the key and the file (``ConfigError``, exit status 2).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from fieldgate.errors import ConfigError
from fieldgate.journal import JOURNAL_SOCKET
from fieldgate.modbus.registers import map_problems
from fieldgate.names import METRIC_RE, NAME_RE
from fieldgate.redact import without_userinfo
from fieldgate.topics import Template, overlap, parse_template

DEFAULT_CONFIG_PATH = "/etc/fieldgate/fieldgate.yaml"
CONFIG_ENV = "FIELDGATE_CONFIG"


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"min": lo, "max": hi}


@dataclass(frozen=True)
class SiteConfig:
    """Who this gateway is."""

    serial: str = field(metadata={"pattern": NAME_RE})
    name: str = ""


@dataclass(frozen=True)
class StoreConfig:
    """The local SQLite store."""

    path: str = "/var/lib/fieldgate/data_store.db"
    retention_days: int = field(default=90, metadata=_range(1, 36500))
    busy_timeout_ms: int = field(default=30000, metadata=_range(100, 600000))


# ---- Device formats (docs/inputs.md, docs/contract.md §9) ---------------------------------

#: Every payload format an input or poll node may name (fieldgate.formats decodes them).
Format = Literal[
    "fieldgate", "csv", "value", "json", "tasmota", "zigbee2mqtt", "shelly", "influx", "thingsboard"
]
TsUnit = Literal["s", "ms", "us", "ns"]


@dataclass(frozen=True)
class CsvOptions:
    """``csv:`` of an input or poll node with ``format: csv``."""

    #: One role per column: ``ts``, ``device``, ``-`` (not read) or a metric name.
    columns: list[str]
    delimiter: str = ","
    ts_unit: TsUnit = "ms"
    #: The first line of every payload names the columns: skipped.
    header: bool = False


@dataclass(frozen=True, kw_only=True)
class FormatOptions:
    """How a payload is read: what ``mqtt.inputs[]`` and ``poll.nodes[]`` share."""

    format: Format = "fieldgate"
    #: Metric name globs: only matching readings are kept (``include``), matching ones are
    #: left out (``exclude``).
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    #: Zone of the payload's times that carry none (IANA name, e.g. Europe/Berlin).
    timezone: str = "UTC"
    #: ``payload``: the payload's own time where it has one; ``arrival``: always the
    #: broker's arrival stamp (for devices whose clock cannot be trusted).
    ts_from: Literal["payload", "arrival"] = "payload"
    csv: CsvOptions | None = None
    #: ``format: json``: where the time and the metrics are (dotted paths), the time's unit.
    ts_path: str | None = None
    metrics_path: str | None = None
    ts_unit: TsUnit | None = None
    #: ``format: influx``: the unit of line protocol timestamps (default ns).
    influx_precision: Literal["ns", "us", "ms", "s"] | None = None


@dataclass(frozen=True, kw_only=True)
class MqttInput(FormatOptions):
    """One subscription beside the native topic: a topic template and how to read it."""

    topic: str
    #: The device of a topic that names none (serial or alias).
    device: str | None = field(default=None, metadata={"pattern": NAME_RE})

    @property
    def template(self) -> Template:
        return parse_template(self.topic)


@dataclass(frozen=True)
class MqttConfig:
    """The local broker the collector subscribes to."""

    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata=_range(1, 65535))
    username: str | None = None
    password_file: str | None = None
    topic_prefix: str = field(default="fieldgate", metadata={"pattern": NAME_RE})
    client_id: str = field(default="fieldgate-collector", metadata={"pattern": NAME_RE})
    qos: int = field(default=1, metadata=_range(1, 2))
    keepalive_secs: int = field(default=60, metadata=_range(5, 3600))
    tls_ca_file: str | None = None
    max_payload_bytes: int = field(default=262144, metadata=_range(64, 268435455))
    commit_max_messages: int = field(default=1000, metadata=_range(1, 100000))
    commit_max_ms: int = field(default=200, metadata=_range(1, 60000))
    reconnect_max_secs: int = field(default=60, metadata=_range(1, 3600))
    #: Where the broker's plugin counts the publishes its ACL denied (``fieldgate broker-conf
    #: --refusals-file``); ``status`` shows them. None: not shown.
    broker_refusals_file: str | None = None
    #: Device topics and formats beside ``<topic_prefix>/<device>/readings`` (docs/inputs.md).
    inputs: list[MqttInput] = field(default_factory=list)

    @property
    def native_topic(self) -> str:
        """The template of the native topic (docs/contract.md §4)."""
        return f"{self.topic_prefix}/{{device}}/readings"


@dataclass(frozen=True)
class DeviceConfig:
    """One sensor allowed to send readings."""

    serial: str = field(metadata={"pattern": NAME_RE})
    alias: str | None = field(default=None, metadata={"pattern": NAME_RE})
    format: Literal["json", "csv"] = "json"
    #: For ``format: csv``: the column names of a line, one of which must be ``ts``;
    #: every other column is a metric.
    csv_columns: list[str] = field(default_factory=list)
    description: str = ""


@dataclass(frozen=True)
class DevicesConfig:
    """The device allowlist and what counts as a plausible reading."""

    allow_unknown: bool = False
    #: Readings stamped further than this in the future are rejected.
    max_future_secs: int = field(default=3600, metadata=_range(0, 10 * 365 * 86400))
    #: Readings stamped before this UTC epoch (seconds) are rejected (default 2000-01-01).
    min_ts_secs: int = field(default=946684800, metadata=_range(0, None))
    list: list[DeviceConfig] = field(default_factory=list)

    def resolve(self, name: str) -> str | None:
        """The canonical serial for a device named by serial or alias, or None if unknown."""
        for dev in self.list:
            if name in (dev.serial, dev.alias):
                return dev.serial
        return None

    def get(self, serial: str) -> DeviceConfig | None:
        """The configuration of a device by its canonical serial."""
        for dev in self.list:
            if dev.serial == serial:
                return dev
        return None


@dataclass(frozen=True, kw_only=True)
class PollNode(FormatOptions):
    """An HTTP node polled for readings, its body read like an input's payload."""

    name: str = field(metadata={"pattern": NAME_RE})
    url: str = field(metadata={"pattern": re.compile(r"^https?://\S+$")})
    #: The device the node's readings belong to (serial or alias).
    device: str = field(metadata={"pattern": NAME_RE})
    timeout_secs: float | None = field(default=None, metadata=_range(0.1, 600))

    @property
    def shown_url(self) -> str:
        """The URL as messages and stored rows name it: without any user:password@."""
        return without_userinfo(self.url)


# --- Modbus (poll.modbus, docs/contract.md §10; the map checks are in
# fieldgate.modbus.registers; docs/modbus.md)


@dataclass(frozen=True)
class ModbusRegister:
    """One value of a Modbus device's register map: ``raw * scale + offset``."""

    metric: str = field(metadata={"pattern": METRIC_RE})
    #: 0-based protocol address (register 30001 of a manual is input address 0).
    address: int = field(metadata=_range(0, 65535))
    table: Literal["holding", "input", "coil", "discrete"]
    #: Required for holding and input registers; coils and discrete inputs are bool.
    type: (
        Literal[
            "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool"
        ]
        | None
    ) = None
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True)
class ModbusDevice:
    """A Modbus TCP (``host``) or RTU (``serial``) device polled for its register map."""

    device: str = field(metadata={"pattern": NAME_RE})
    registers: list[ModbusRegister]
    host: str | None = field(
        default=None, metadata={"pattern": re.compile(r"^[A-Za-z0-9.:%][A-Za-z0-9.:%-]{0,252}$")}
    )
    port: int | None = field(default=None, metadata=_range(1, 65535))
    serial: str | None = field(default=None, metadata={"pattern": re.compile(r"^/\S+$")})
    baudrate: int | None = field(default=None, metadata=_range(300, 4_000_000))
    parity: Literal["N", "E", "O"] | None = None
    stopbits: int | None = field(default=None, metadata=_range(1, 2))
    bytesize: int | None = None
    #: The unit (slave) id: 1-247 on a serial line; 0-255 over TCP (often 1 or 255).
    unit: int = field(default=1, metadata=_range(0, 255))
    #: Default: poll.interval_secs and poll.timeout_secs.
    interval_secs: float | None = field(default=None, metadata=_range(0.1, 86400))
    timeout_secs: float | None = field(default=None, metadata=_range(0.05, 600))
    #: A failing device is retried at its interval, doubled per failure up to this.
    retry_max_secs: float = field(default=300, metadata=_range(0.1, 86400))
    #: Unused addresses one read may bridge between two entries (0: contiguous runs only).
    max_gap: int = field(default=10, metadata=_range(0, 2000))
    max_read_registers: int = field(default=125, metadata=_range(1, 125))
    max_read_bits: int = field(default=2000, metadata=_range(1, 2000))

    @property
    def tcp(self) -> bool:
        return self.host is not None

    @property
    def port_or_default(self) -> int:
        return 502 if self.port is None else self.port

    @property
    def line(self) -> tuple[int, str, int, int]:
        """(baudrate, parity, stopbits, bytesize) of a serial line; the Modbus serial line
        specification's defaults are 19200 baud, even parity, 1 stop bit, 8 data bits."""
        return (
            19200 if self.baudrate is None else self.baudrate,
            self.parity or "E",
            1 if self.stopbits is None else self.stopbits,
            8 if self.bytesize is None else self.bytesize,
        )

    @property
    def bus(self) -> str:
        """``tcp HOST:PORT`` or ``rtu /dev/…``: devices on one bus are polled one at a time."""
        if self.host is not None:
            return f"tcp {self.host}:{self.port_or_default}"
        return f"rtu {self.serial}"


@dataclass(frozen=True)
class PollConfig:
    """Polling of HTTP nodes that cannot publish and of Modbus devices."""

    interval_secs: float = field(default=60, metadata=_range(1, 86400))
    timeout_secs: float = field(default=5, metadata=_range(0.1, 600))
    nodes: list[PollNode] = field(default_factory=list)
    modbus: list[ModbusDevice] = field(default_factory=list)


@dataclass(frozen=True)
class UploadConfig:
    """Batching and upload to the hub."""

    url: str | None = field(default=None, metadata={"pattern": re.compile(r"^https?://\S+$")})
    key_file: str = "/etc/fieldgate/secrets/gateway_key"
    interval_secs: float = field(default=300, metadata=_range(1, 86400))
    batch_max_rows: int = field(default=50000, metadata=_range(1, 10_000_000))
    mode: Literal["LIVE", "TEST", "PASS"] = "LIVE"
    type: str = field(default="readings", metadata={"pattern": NAME_RE})
    pending_dir: str = "/var/lib/fieldgate/batches/pending"
    uploaded_dir: str = "/var/lib/fieldgate/batches/uploaded"
    delete_batch_on_upload: bool = False
    delete_reading_on_zip: bool = False
    timeout_secs: float = field(default=60, metadata=_range(1, 3600))
    retry_initial_secs: float = field(default=2, metadata=_range(0.01, 3600))
    retry_max_secs: float = field(default=300, metadata=_range(0.01, 86400))


@dataclass(frozen=True)
class ExportConfig:
    """USB export."""

    password_file: str = "/etc/fieldgate/secrets/export_password"  # noqa: S105 (a path)
    #: A Linux LED class device directory; null for a gateway without an LED.
    led_path: str | None = "/sys/class/leds/gpo1"
    log_file: str = "/var/log/fieldgate/usb_exporter.log"
    #: ``log_file`` is rotated at this size (0: never), keeping ``log_backups`` older files.
    log_max_bytes: int = field(default=10 * 1024 * 1024, metadata=_range(0, None))
    log_backups: int = field(default=5, metadata=_range(0, 1000))
    #: Where ``usb-event`` records device events for ``usb-watch``.
    spool_dir: str = "/run/fieldgate/usb-events"
    #: Private mount points for drives being exported to.
    mount_dir: str = "/run/fieldgate/usb-mounts"
    #: Free space demanded on the drive beyond the export's size, in percent.
    space_margin_percent: int = field(default=10, metadata=_range(0, 1000))
    #: How the copy is checked before it gets its final name. Always: read back from the
    #: drive's device and compared with what SQLite wrote, its header and schema read.
    #: ``quick_check`` / ``integrity_check`` add that SQLite check of the snapshot (O(N) /
    #: CPU-bound, while the drive syncs); ``readback`` adds nothing.
    verify: Literal["readback", "quick_check", "integrity_check"] = "readback"


@dataclass(frozen=True)
class DiskConfig:
    """The disk guard of the store's filesystem."""

    stop_accepting_at_percent: float = field(default=98, metadata=_range(1, 100))
    #: Intake resumes below this use; default one point under the stop threshold.
    resume_below_percent: float | None = field(default=None, metadata=_range(0, 100))
    check_interval_secs: float = field(default=5, metadata=_range(0.1, 3600))

    @property
    def resume_percent(self) -> float:
        if self.resume_below_percent is not None:
            return self.resume_below_percent
        return max(0.0, self.stop_accepting_at_percent - 1)


@dataclass(frozen=True)
class LogConfig:
    """Logging to stderr, which supervisor captures, and optionally to the systemd journal."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Send every log line to the journal as well, as ``fieldgate-<command>``
    #: (``journalctl -t fieldgate-collect``).
    journal: bool = False
    #: journald's native socket (another one for a journal namespace).
    journal_socket: str = JOURNAL_SOCKET


@dataclass(frozen=True)
class WebConfig:
    """``fieldgate web``: the gateway's own read-only page (docs/gateway-page.md)."""

    #: The address it listens on: the management interface's (Ansible renders it).
    listen_address: str = field(
        default="127.0.0.1", metadata={"pattern": re.compile(r"^[0-9A-Fa-f.:]{2,45}$")}
    )
    port: int = field(default=8081, metadata=_range(1, 65535))
    #: Devices whose latest reading is older than this are left off the latest-readings
    #: page (``?all=true`` shows them).
    hide_inactive_after_days: float = field(default=30, metadata=_range(0.001, 36500))
    #: A device chart draws at most this many points per metric: a longer day is averaged
    #: over buckets (the JSON gives the raw readings unless asked for buckets).
    chart_max_points: int = field(default=2000, metadata=_range(10, 100000))
    #: Requests served at once; a connection beyond them is answered 503 at once.
    max_connections: int = field(default=8, metadata=_range(1, 256))


@dataclass(frozen=True)
class PullConfig:
    """Pull mode: where ``fieldgate pull-run`` records the gateway's last ``ansible-pull``
    (docs/pull-mode.md); ``status`` and the heartbeat report it."""

    #: None: not shown (the gateway is converged by push only).
    result_file: str | None = None


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``path`` is where it was read from."""

    site: SiteConfig
    store: StoreConfig = field(default_factory=StoreConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    log: LogConfig = field(default_factory=LogConfig)
    web: WebConfig = field(default_factory=WebConfig)
    pull: PullConfig = field(default_factory=PullConfig)
    path: str = field(default="", metadata={"internal": True})
    raw: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})

    def secret(self, key: str) -> str:
        """Read the secret named by the dotted ``*_file`` key (e.g. ``mqtt.password_file``)."""
        section, _, name = key.partition(".")
        path = getattr(getattr(self, section), name)
        if not path:
            raise ConfigError(f"{self.path}: {key} is not set")
        return read_secret(self.path, key, path)


def read_secret(config_path: str, key: str, path: str) -> str:
    """The content of a secret file, stripped of surrounding whitespace; never logged."""
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: {key}: secret file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{config_path}: {key}: secret file {path} is not readable") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: {key}: cannot read secret file {path}: {exc}") from None
    if not value:
        raise ConfigError(f"{config_path}: {key}: secret file {path} is empty")
    return value


def config_path(explicit: str | None = None) -> str:
    """``--config``, else ``$FIELDGATE_CONFIG``, else the default path."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str | None = None) -> Config:
    """Read and validate the configuration file; ConfigError names the key and the file."""
    path = config_path(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} "
            "(save the file as UTF-8)"
        ) from None
    return parse_config(parse_yaml(text, path), path)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (at any depth), which
    it would otherwise let the last one win silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges: explicit keys override merged ones, by design
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: the base loader says what is wrong with it
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given at line {first.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, path: str) -> Any:
    """A YAML document as data; ConfigError with one line for what is wrong with it."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError:  # int() past Python's digit limit
        raise ConfigError(
            f"{path}: not valid YAML: an integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    return {} if data is None else data


def parse_config(data: Any, path: str = "<config>") -> Config:
    """Validate an already parsed YAML document (used by tests and ``load_config``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = _build(Config, data, "", path)
    cfg = _replace_internal(cfg, path=path, raw=data)
    _check_devices(cfg)
    _check_modbus(cfg)
    _check_inputs(cfg)
    _check_web(cfg)
    return cfg


def check_configs(texts: typing.Mapping[str, str]) -> dict[str, str]:
    """Validate several configurations in one go (YAML text by name): the problem line of
    each refused one (``name: key: what is wrong``, as ``check-config`` prints it), else
    "" for it. Ansible's validation play checks every host's rendered configuration with
    one Python start instead of one per host."""
    problems = {}
    for name, text in texts.items():
        try:
            parse_config(parse_yaml(text, name), name)
        except ConfigError as exc:
            problems[name] = str(exc)
        else:
            problems[name] = ""
    return problems


def _check_web(cfg: Config) -> None:
    try:
        ipaddress.ip_address(cfg.web.listen_address)
    except ValueError:
        raise _fail(
            cfg, "web.listen_address", f"{cfg.web.listen_address!r} is not an IP address"
        ) from None


def _replace_internal(cfg: Config, **values: Any) -> Config:
    kwargs = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    kwargs.update(values)
    return Config(**kwargs)


def _check_devices(cfg: Config) -> None:
    seen: dict[str, int] = {}
    for i, dev in enumerate(cfg.devices.list):
        for name in filter(None, (dev.serial, dev.alias)):
            if name in seen and seen[name] != i:
                raise ConfigError(
                    f"{cfg.path}: devices.list[{i}]: name {name!r} is already used by "
                    f"devices.list[{seen[name]}]"
                )
            seen[name] = i
        if dev.format == "csv":
            if "ts" not in dev.csv_columns or len(dev.csv_columns) < 2:
                raise ConfigError(
                    f"{cfg.path}: devices.list[{i}].csv_columns: a csv device needs a 'ts' "
                    "column and at least one metric column"
                )
            if len(set(dev.csv_columns)) != len(dev.csv_columns):
                raise ConfigError(f"{cfg.path}: devices.list[{i}].csv_columns: duplicate column")
    for i, node in enumerate(cfg.poll.nodes):
        if not cfg.devices.allow_unknown and cfg.devices.resolve(node.device) is None:
            raise ConfigError(
                f"{cfg.path}: poll.nodes[{i}].device: {node.device!r} is not in devices.list"
            )
    if cfg.disk.resume_percent > cfg.disk.stop_accepting_at_percent:
        raise ConfigError(
            f"{cfg.path}: disk.resume_below_percent: must not exceed disk.stop_accepting_at_percent"
        )


def _check_modbus(cfg: Config) -> None:
    """What the schema cannot say about ``poll.modbus``: one line naming the first mistake."""
    first_of: dict[str, int] = {}  # canonical device -> index
    on_bus: dict[tuple[str, int], int] = {}  # (bus, unit) -> index
    line_of: dict[str, tuple[int, tuple[int, str, int, int]]] = {}  # serial port -> index, line
    for i, dev in enumerate(cfg.poll.modbus):
        where = f"{cfg.path}: poll.modbus[{i}]"
        serial = cfg.devices.resolve(dev.device)
        if serial is None and not cfg.devices.allow_unknown:
            raise ConfigError(f"{where}.device: {dev.device!r} is not in devices.list")
        serial = serial or dev.device
        if serial in first_of:
            raise ConfigError(
                f"{where}.device: {dev.device!r} is already polled by "
                f"poll.modbus[{first_of[serial]}]"
            )
        first_of[serial] = i
        if (dev.host is None) == (dev.serial is None):
            raise ConfigError(
                f"{where}: give either host (Modbus TCP) or serial (Modbus RTU)"
                + (", not both" if dev.host is not None else "")
            )
        if dev.host is not None:
            for key in ("baudrate", "parity", "stopbits", "bytesize"):
                if getattr(dev, key) is not None:
                    raise ConfigError(f"{where}.{key}: only for Modbus RTU (serial), not host")
        else:
            if dev.port is not None:
                raise ConfigError(f"{where}.port: only for Modbus TCP (host), not serial")
            if dev.bytesize not in (None, 8):
                raise ConfigError(
                    f"{where}.bytesize: Modbus RTU frames need 8 data bits, got {dev.bytesize}"
                )
            if not 1 <= dev.unit <= 247:
                raise ConfigError(
                    f"{where}.unit: a Modbus RTU unit is 1 to 247 (0 is broadcast), got {dev.unit}"
                )
            assert dev.serial is not None
            if dev.serial in line_of and line_of[dev.serial][1] != dev.line:
                j, line = line_of[dev.serial]
                raise ConfigError(
                    f"{where}: serial line {_line_text(dev.line)} differs from "
                    f"{_line_text(line)} of poll.modbus[{j}] on the same port {dev.serial}"
                )
            line_of.setdefault(dev.serial, (i, dev.line))
        if (dev.bus, dev.unit) in on_bus:
            raise ConfigError(
                f"{where}.unit: unit {dev.unit} on {dev.bus} is already "
                f"poll.modbus[{on_bus[dev.bus, dev.unit]}]"
            )
        on_bus[dev.bus, dev.unit] = i
        for key, problem in map_problems(
            dev.registers,
            max_read_registers=dev.max_read_registers,
            max_read_bits=dev.max_read_bits,
        ):
            raise ConfigError(f"{where}.{key}: {problem}")


def _line_text(line: tuple[int, str, int, int]) -> str:
    baudrate, parity, stopbits, bytesize = line
    return f"{baudrate} {bytesize}{parity}{stopbits}"


def _fail(cfg: Config, key: str, text: str) -> ConfigError:
    return ConfigError(f"{cfg.path}: {key}: {text}")


def _check_inputs(cfg: Config) -> None:
    """``mqtt.inputs`` and the format options of ``poll.nodes`` (docs/inputs.md)."""
    native = parse_template(cfg.mqtt.native_topic)
    taken: list[tuple[str, Template]] = [("the native topic", native)]
    for i, inp in enumerate(cfg.mqtt.inputs):
        key = f"mqtt.inputs[{i}]"
        try:
            t = parse_template(inp.topic)
        except ValueError as exc:
            raise _fail(cfg, f"{key}.topic", f"{inp.topic!r}: {exc}") from None
        _check_format(cfg, key, inp)
        if inp.format == "value" and t.metric_at is None:
            raise _fail(
                cfg, f"{key}.topic", "format value needs a {metric} level naming the reading"
            )
        if inp.format == "fieldgate" and t.metric_at is not None:
            raise _fail(cfg, f"{key}.topic", "fieldgate payloads name their metrics: no {metric}")
        column = inp.csv is not None and "device" in inp.csv.columns
        if inp.device is not None and (t.device_at is not None or column):
            where = "a {device} level" if t.device_at is not None else "the csv device column"
            raise _fail(cfg, f"{key}.device", f"the device is already named by {where}")
        if inp.device is None and t.device_at is None and not column:
            raise _fail(
                cfg,
                f"{key}.topic",
                f"{inp.topic!r} names no device: add a {{device}} level or set {key}.device",
            )
        unknown = inp.device is not None and cfg.devices.resolve(inp.device) is None
        if unknown and not cfg.devices.allow_unknown:
            raise _fail(cfg, f"{key}.device", f"{inp.device!r} is not in devices.list")
        for other_key, other in taken:
            example = overlap(t, other)
            if example is not None:
                raise _fail(
                    cfg,
                    f"{key}.topic",
                    f"{inp.topic!r} overlaps {other_key} ({other.text!r}): a message on "
                    f"{example!r} would match both",
                )
        taken.append((f"{key}.topic", t))
    for i, node in enumerate(cfg.poll.nodes):
        key = f"poll.nodes[{i}]"
        _check_format(cfg, key, node)
        if node.format == "value":
            raise _fail(cfg, f"{key}.format", "value names its metric by a topic level: use json")


def _check_format(cfg: Config, key: str, o: FormatOptions) -> None:
    """The options of one input or poll node fit its format."""
    if o.format == "csv":
        if o.csv is None:
            raise _fail(cfg, f"{key}.csv", "required for format csv (csv.columns names the fields)")
        _check_csv(cfg, f"{key}.csv", o.csv)
    elif o.csv is not None:
        raise _fail(cfg, f"{key}.csv", f"only for format csv (this is {o.format})")
    if o.format != "json":
        for name in ("ts_path", "metrics_path", "ts_unit"):
            if getattr(o, name) is not None:
                hint = " (csv: csv.ts_unit)" if name == "ts_unit" and o.format == "csv" else ""
                raise _fail(cfg, f"{key}.{name}", f"only for format json{hint}")
    for name in ("ts_path", "metrics_path"):
        path = getattr(o, name)
        if path is not None and (not path or "" in path.split(".")):
            raise _fail(cfg, f"{key}.{name}", f"{path!r} is not a dotted path (a.b.c)")
    if o.influx_precision is not None and o.format != "influx":
        raise _fail(cfg, f"{key}.influx_precision", "only for format influx")
    if o.format == "fieldgate":
        for name, default in (("include", []), ("exclude", []), ("timezone", "UTC")):
            if getattr(o, name) != default:
                raise _fail(cfg, f"{key}.{name}", "not for format fieldgate (docs/contract.md §4)")
        if o.ts_from != "payload":
            raise _fail(cfg, f"{key}.ts_from", "not for format fieldgate (its payloads carry ts)")
    for name in ("include", "exclude"):
        for j, glob in enumerate(getattr(o, name)):
            problem = glob_problem(glob)
            if problem:
                raise _fail(cfg, f"{key}.{name}[{j}]", f"{glob!r}: {problem}")
    if o.timezone != "UTC":
        try:
            ZoneInfo(o.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise _fail(
                cfg,
                f"{key}.timezone",
                f"unknown time zone {o.timezone!r} (an IANA name such as Europe/Berlin)",
            ) from None


def _check_csv(cfg: Config, key: str, c: CsvOptions) -> None:
    if len(c.delimiter) != 1 or c.delimiter in '"\r\n':
        raise _fail(
            cfg, f"{key}.delimiter", f"{c.delimiter!r}: one character, not a quote or newline"
        )
    if not c.columns:
        raise _fail(cfg, f"{key}.columns", "empty: name every column (- for one not read)")
    seen: set[str] = set()
    for i, col in enumerate(c.columns):
        if col not in ("-", "ts", "device") and not METRIC_RE.fullmatch(col):
            raise _fail(
                cfg,
                f"{key}.columns[{i}]",
                f"{col!r} is not ts, device, - or a metric name (letters, digits, _ . : % -)",
            )
        if col != "-" and col in seen:
            raise _fail(cfg, f"{key}.columns[{i}]", f"{col!r} appears twice")
        seen.add(col)
    if not seen - {"-", "ts", "device"}:
        raise _fail(cfg, f"{key}.columns", "no metric column: nothing to read")


#: Characters a metric-name glob may hold: a metric name's, and fnmatch's * ? [ ] !
_GLOB_RE = re.compile(r"^[A-Za-z0-9_.:%*?!\[\]-]+$")


def glob_problem(glob: str) -> str | None:
    """Why an include/exclude glob can never match a metric name, or None."""
    if not glob:
        return "empty"
    if not _GLOB_RE.match(glob):
        return "can never match a metric name (letters, digits, _ . : % - and * ? [ ])"
    depth = 0
    for ch in glob:
        if ch == "[":
            if depth:
                return "'[' inside [...]"
            depth = 1
        elif ch == "]" and depth:
            depth = 0
    if depth:
        return "'[' is never closed"
    return None


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(value), type(value).__name__
    )
    if isinstance(value, dict):
        kind = "mapping"
    elif isinstance(value, list):
        kind = "list"
    elif value is None:
        return "null"
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kind} {shown}"


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], list[Any]]:
    """A section's field types and its public fields, worked out once per class (a Modbus
    map of thousands of registers builds thousands of ``ModbusRegister``)."""
    return typing.get_type_hints(cls), [f for f in fields(cls) if not f.metadata.get("internal")]


def _build(cls: type, data: Any, where: str, path: str) -> Any:
    label = where or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {label}: expected a mapping, got {_describe(data)}")
    hints, public = _schema(cls)
    known = {f.name for f in public}
    for key in data:
        if key not in known:
            dotted = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{path}: {dotted}: unknown key")
    kwargs: dict[str, Any] = {}
    for f in public:
        dotted = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], dotted, path, f.metadata)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{path}: {dotted}: required key is missing")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, path: str, meta: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, path, meta)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{path}: {key}: must be one of {choices}, got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {key}: expected a list, got {_describe(value)}")
        (inner,) = args
        return [_coerce(inner, v, f"{key}[{i}]", path, {}) for i, v in enumerate(value)]
    if is_dataclass(tp):
        return _build(tp, value, key, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: {key}: expected an integer, got {_describe(value)}")
        _check_range(value, key, path, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: {key}: expected a number, got {_describe(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{path}: {key}: must be a finite number, got {_describe(value)}")
        _check_range(number, key, path, meta)
        return number
    if tp is str:
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, int | float) else ""
            raise ConfigError(f"{path}: {key}: expected a string, got {_describe(value)}{hint}")
        pattern = meta.get("pattern") if meta else None
        if pattern is not None and not pattern.fullmatch(value):
            raise ConfigError(f"{path}: {key}: {value!r} is not a valid value here")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug, not an operator error


def _check_range(value: float, key: str, path: str, meta: Any) -> None:
    lo = meta.get("min") if meta else None
    hi = meta.get("max") if meta else None
    if lo is not None and value < lo:
        raise ConfigError(f"{path}: {key}: must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}: {key}: must be at most {hi}, got {value}")


SECRET_KEY_RE = re.compile(r"(password|secret|key|token|pin)", re.IGNORECASE)


def redacted(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw configuration with every secret-bearing key removed (for exports)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if not SECRET_KEY_RE.search(str(k))}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(raw)
