"""What the gateway's Mosquitto must load: the arrival-stamp plugin (CONTRACT §9).

``fieldgate broker-conf`` prints the configuration lines; every broker that feeds a collector
(the mosquitto role, every test broker) adds exactly those lines. The plugin
(``plugins/fieldgate_stamp.c``, shipped inside this package) gives every incoming PUBLISH the
MQTT v5 user property ``fg-ts``: its arrival time in epoch milliseconds, strictly increasing
per topic. :mod:`fieldgate.stamp` reads it on the collector side.

Where the ``.so`` comes from, in this order:

1. ``--plugin FILE`` or ``$FIELDGATE_STAMP_PLUGIN``: a prebuilt plugin, used as named (it must
   exist, be built for this machine and from this version's source).
2. :data:`INSTALLED_PLUGIN`, where the Ansible role puts the plugin it ships prebuilt in the
   offline bundle; skipped (with the reason, should nothing else work) when it is not for this
   machine or was built from another version's source.
3. The cache directory (``--cache-dir``, ``$FIELDGATE_CACHE_DIR``, else ``/var/cache/fieldgate``
   as root or ``$XDG_CACHE_HOME/fieldgate``): a plugin built earlier from the same source for the
   same target, or built there now with ``$CC`` (default ``gcc``) and Debian's ``mosquitto-dev``
   and ``libmosquitto-dev`` headers.

Each build is named by the first 16 hex digits of the source's SHA-256, which the ``.so``
also carries as the string ``fieldgate_stamp build <digest>``: a plugin is never mistaken for
one built from other source. A cross compiler (``--cc aarch64-linux-gnu-gcc``) builds for that
target (the name carries the compiler's target triple): that is how a bundle for arm64
gateways is made on an amd64 machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from fieldgate.errors import FieldgateError

PLUGIN_ENV = "FIELDGATE_STAMP_PLUGIN"
CACHE_ENV = "FIELDGATE_CACHE_DIR"
#: Where the Ansible role installs the prebuilt plugin on a gateway.
INSTALLED_PLUGIN = Path("/usr/local/lib/fieldgate/fieldgate_stamp.so")
#: The user property the plugin adds (and strips from clients).
STAMP_PROPERTY = "fg-ts"
#: Headers the build needs, and the Debian package of each.
HEADERS = {
    "mosquitto_broker.h": "mosquitto-dev",
    "mosquitto_plugin.h": "mosquitto-dev",
    "mosquitto.h": "libmosquitto-dev",
    "mqtt_protocol.h": "libmosquitto-dev",
}
INCLUDE_DIRS = (Path("/usr/include"), Path("/usr/local/include"))
CFLAGS = ("-O2", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-fPIC", "-shared")
_MARKER = b"fieldgate_stamp build "


class PluginError(FieldgateError):
    """The plugin can be neither found nor built; the message says what is missing."""


def plugin_source() -> bytes:
    """The C source shipped inside the package."""
    return (resources.files("fieldgate") / "plugins" / "fieldgate_stamp.c").read_bytes()


def source_digest(source: bytes | None = None) -> str:
    """16 hex digits naming one version of the plugin source."""
    return hashlib.sha256(plugin_source() if source is None else source).hexdigest()[:16]


def built_from(so: Path) -> str | None:
    """The source digest a plugin file was built from (``None``: not a fieldgate build)."""
    data = so.read_bytes()
    at = data.find(_MARKER)
    if at < 0:
        return None
    end = data.find(b"\0", at)
    return data[at + len(_MARKER) : end].decode("ascii", "replace")


def _elf_target(path: Path) -> tuple[int, int, int] | None:
    """(class, byte order, machine) of an ELF file, or None if it is not one."""
    with path.open("rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return head[4], head[5], int.from_bytes(head[18:20], order)


def unusable_reason(so: Path, digest: str) -> str | None:
    """Why a prebuilt plugin cannot be loaded by this machine's broker, or None if it can."""
    if not so.is_file():
        return f"{so} does not exist"
    here = _elf_target(Path(os.path.realpath(sys.executable)))
    there = _elf_target(so)
    if there is None:
        return f"{so} is not a shared library (ELF)"
    if here is not None and there != here:
        return f"{so} is built for another architecture"
    got = built_from(so)
    if got != digest:
        what = f"source {got}" if got else "an unknown source"
        return f"{so} was built from {what}, this fieldgate ships source {digest}"
    return None


def default_cache_dir() -> Path:
    """Where plugins are built when no prebuilt one exists."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.geteuid() == 0:
        # readable by the mosquitto user (root's home is not)
        return Path("/var/cache/fieldgate")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fieldgate"


def _compiler(cc: str) -> tuple[str, str]:
    """(path of the compiler, its target triple)."""
    path = shutil.which(cc)
    if path is None:
        hint = " (apt-get install gcc)" if cc == "gcc" else ""
        raise PluginError(f"cannot build the Mosquitto stamp plugin: no C compiler {cc!r}{hint}")
    triple = subprocess.run(
        [path, "-dumpmachine"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not triple:
        raise PluginError(f"cannot build the Mosquitto stamp plugin: {cc} -dumpmachine failed")
    return path, triple


def _headers() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name in HEADERS:
        for d in INCLUDE_DIRS:
            if (d / name).is_file():
                found[name] = d / name
                break
    missing = [n for n in HEADERS if n not in found]
    if missing:
        pkgs = " ".join(sorted({HEADERS[n] for n in missing}))
        raise PluginError(
            "cannot build the Mosquitto stamp plugin: header "
            f"{', '.join(missing)} missing (apt-get install {pkgs})"
        )
    return found


def build_plugin(out: Path, *, cc: str = "gcc") -> Path:
    """Compile the shipped source into ``out`` (atomically: a concurrent build is harmless).

    Only the Mosquitto headers are put on the include path (through a directory of links), so
    a cross compiler keeps its own C library headers.
    """
    path, _triple = _compiler(cc)
    headers = _headers()
    source = plugin_source()
    digest = source_digest(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fieldgate-stamp-") as tmp:
        inc = Path(tmp) / "include"
        inc.mkdir()
        for name, real in headers.items():
            (inc / name).symlink_to(real)
        src = Path(tmp) / "fieldgate_stamp.c"
        src.write_bytes(source)
        partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        cmd = [path, *CFLAGS, f'-DFG_STAMP_BUILD="{digest}"', "-I", str(inc)]
        result = subprocess.run(
            [*cmd, "-o", str(partial), str(src)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            first = next(
                (ln for ln in result.stderr.splitlines() if "error" in ln),
                result.stderr.strip().splitlines()[0] if result.stderr.strip() else "",
            )
            raise PluginError(f"cannot build the Mosquitto stamp plugin: {cc} failed: {first}")
    partial.chmod(0o644)
    partial.replace(out)
    return out


def locate_plugin(
    explicit: Path | None = None,
    *,
    cache_dir: Path | None = None,
    cc: str | None = None,
    installed: Path = INSTALLED_PLUGIN,
) -> Path:
    """The plugin file the broker should load (see the module docstring for the order).

    ``cc`` names a compiler to build with, skipping the installed plugin (a cross build);
    otherwise builds use ``$CC`` or ``gcc``.
    """
    digest = source_digest()
    if explicit is None and os.environ.get(PLUGIN_ENV):
        explicit = Path(os.environ[PLUGIN_ENV])
    if explicit is not None:
        reason = unusable_reason(explicit, digest)
        if reason:
            raise PluginError(f"prebuilt Mosquitto stamp plugin unusable: {reason}")
        return explicit.absolute()
    skipped = None
    if cc is None:
        skipped = unusable_reason(installed, digest)
        if skipped is None:
            return installed
    compiler = cc or os.environ.get("CC") or "gcc"
    try:
        _path, triple = _compiler(compiler)
        target = (cache_dir or default_cache_dir()) / f"fieldgate_stamp-{digest}-{triple}.so"
        if target.is_file() and built_from(target) == digest:
            return target.absolute()
        return build_plugin(target, cc=compiler).absolute()
    except PluginError as exc:
        if skipped and installed.exists():
            raise PluginError(f"{exc}; and {skipped}") from None
        raise


def _plugin_path_option(option: str, path: Path) -> None:
    if not path.is_absolute():
        raise PluginError(f"--{option} must be an absolute path, not {path}")
    if any(c.isspace() for c in str(path)):
        raise PluginError(f"--{option} must hold no white space: {str(path)!r}")


def conf_lines(
    plugin: Path, refusals_file: Path | None = None, broker_log: Path | None = None
) -> list[str]:
    """The Mosquitto configuration lines that load the plugin (Mosquitto 2.0).

    The plugin also has the broker save its persistence database within 0.5 s of a message
    (docs/broker-persistence.md). With ``refusals_file`` it counts the publishes the broker's
    ACL denied, per account, into that file (:mod:`fieldgate.refusals`); the broker must then
    have an ``acl_file``, as the mosquitto role writes. With ``broker_log`` as well (the
    broker's ``log_dest file``, with notices) it counts the connections dropped for protocol
    errors, per account or source address, into the same file.
    """
    lines = [
        f"# fieldgate: stamp each incoming message with its arrival time ({STAMP_PROPERTY}); "
        "save the persistence database within 0.5 s of a message",
        f"plugin {plugin}",
    ]
    if broker_log is not None and refusals_file is None:
        raise PluginError("--broker-log needs --refusals-file (the counts are written there)")
    if refusals_file is not None:
        _plugin_path_option("refusals-file", refusals_file)
        lines += [
            "# count the publishes the ACL denies, per account (fieldgate status shows them)",
            f"plugin_opt_refusals_file {refusals_file}",
        ]
    if broker_log is not None:
        _plugin_path_option("broker-log", broker_log)
        lines += [
            "# count the connections dropped for protocol errors, from the broker's log "
            "(it must be log_dest file there, with log_type notice)",
            f"plugin_opt_broker_log {broker_log}",
        ]
    return lines
