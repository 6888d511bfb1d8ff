#!/usr/bin/env python3
"""The per-architecture steps of the offline bundle (the fieldgate_bundle role runs them).

    bundle_arch.py wheels --arch ARCH --dest DIR --glue-wheel WHL [--pip-arg=ARG ...] REQ ...
        Every dependency of REQ ... as a wheel for ARCH (`pip download --only-binary=:all:`
        with the target's platform, Python version and ABI), plus the glue wheel, in DIR.
        Fetched again only when the requirements, the target or the pip arguments changed.
    bundle_arch.py check --arch ARCH DIR
        Every wheel in DIR/wheels installs on ARCH, every .deb in DIR/debs is of ARCH or
        `all`, every shared library in DIR/plugins (the arrival-stamp plugin) is an ELF file
        for ARCH's machine.
    bundle_arch.py pack --arch ARCH --src DIR --archive FILE
        DIR's debs/, wheels/ and plugins/ into the tar FILE and FILE.sha256, when they changed
        since the last pack.

A dependency without a wheel for the target, or a file of another architecture, is refused
with one line on stderr (exit 3). `wheels` and `pack` print `changed` or `unchanged`.
The target is Debian 12 (Raspberry Pi OS 12 alike): CPython 3.11, glibc 2.36 (--python,
--glibc). Needs pip and packaging in the Python that runs it (ansible-core depends on both).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

# dpkg architecture -> machine in wheel platform tags
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
# dpkg architecture -> ELF e_machine (EM_X86_64, EM_AARCH64); both 64-bit little-endian
ELF_MACHINES = {"amd64": 62, "arm64": 183}
PARTS = ("debs", "wheels", "plugins")
GLUE_WHEEL = re.compile(r"^fieldgate-\d[^-]*-py3-none-any\.whl$")
REFUSED = 3


class Refused(Exception):
    """The bundle cannot be built as asked; one line says why."""


def platforms(arch: str, glibc: str) -> list[str]:
    """The wheel platform tags a Debian host of arch with this glibc installs, newest first."""
    machine = ARCHES[arch]
    major, minor = (int(p) for p in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 4, -1)]
    legacy = ("manylinux2014", "manylinux2010", "manylinux1")
    return [*tags, *(f"{name}_{machine}" for name in legacy)]


def supported_tags(arch: str, python: str, glibc: str) -> set[Tag]:
    """What pip on the target accepts: CPython's own tags, abi3 and pure-Python wheels."""
    version = tuple(int(p) for p in python.split("."))
    plats = platforms(arch, glibc)
    interp = f"cp{version[0]}{version[1]}"
    return set(cpython_tags(version, abis=[interp], platforms=plats)) | set(
        compatible_tags(version, interpreter=interp, platforms=plats)
    )


def target(args: argparse.Namespace) -> str:
    return f"{args.arch} ({ARCHES[args.arch]}, CPython {args.python}, glibc {args.glibc})"


# --------------------------------------------------------------------------- wheels


def fetch_wheels(args: argparse.Namespace) -> bool:
    """Fill args.dest with the dependency wheels and the glue wheel; True when it changed."""
    dest: Path = args.dest
    glue: Path = args.glue_wheel
    if not (GLUE_WHEEL.match(glue.name) and glue.is_file()):
        raise Refused(f"{glue} is not a pure-Python fieldgate wheel")
    inputs = {
        "arch": args.arch, "python": args.python, "glibc": args.glibc,
        "requirements": args.requirements, "pip_args": args.pip_arg,
    }  # fmt: skip
    stamp = dest / ".fieldgate-wheels.json"
    changed = False
    if not stamp.exists() or json.loads(stamp.read_text()) != inputs:
        new = dest.with_name(dest.name + ".new")
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
        version = args.python.split(".")
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--dest", str(new), "--only-binary=:all:", "--implementation", "cp",
            "--python-version", args.python, "--abi", f"cp{version[0]}{version[1]}",
            *(f"--platform={p}" for p in platforms(args.arch, args.glibc)),
            *args.pip_arg, *args.requirements,
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            shutil.rmtree(new, ignore_errors=True)
            missing = re.search(r"No matching distribution found for (\S+)", res.stderr)
            if missing:
                raise Refused(
                    f"no wheel of {missing.group(1)} for {target(args)}: every dependency must "
                    "come as a wheel for the target (pip download --only-binary=:all:)"
                )
            tail = " | ".join(res.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"pip download failed ({res.returncode}): {tail}")
        stamp_new = new / stamp.name
        stamp_new.write_text(json.dumps(inputs, indent=1) + "\n")
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        changed = True
    placed = dest / glue.name
    if not placed.exists() or not filecmp.cmp(glue, placed, shallow=False):
        shutil.copy2(glue, placed)
        changed = True
    for other in dest.glob("fieldgate-*.whl"):
        if other.name != glue.name and GLUE_WHEEL.match(other.name):
            other.unlink()
            changed = True
    return changed


# --------------------------------------------------------------------------- check


def check(args: argparse.Namespace) -> int:
    """Refuse the first file in the bundle directory that does not belong to args.arch."""
    root: Path = args.dir
    ok = supported_tags(args.arch, args.python, args.glibc)
    counted = 0
    for path in sorted((root / "wheels").glob("*")):
        if path.name.startswith(".") or path.is_dir():
            continue
        try:
            tags = parse_wheel_filename(path.name)[3]
        except InvalidWheelFilename:
            raise Refused(f"wheels/{path.name} is not a wheel (only wheels are bundled)") from None
        if not tags & ok:
            raise Refused(f"wheels/{path.name} does not install on {target(args)}")
        counted += 1
    for path in sorted((root / "debs").glob("*.deb")):
        res = subprocess.run(
            ["dpkg-deb", "--field", str(path), "Architecture"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        deb_arch = res.stdout.strip()
        if res.returncode != 0 or deb_arch not in (args.arch, "all"):
            what = deb_arch or res.stderr.strip() or "unreadable"
            raise Refused(f"debs/{path.name} is for {what}, not {args.arch} or all")
        counted += 1
    for path in sorted((root / "plugins").glob("*.so")):
        machine = elf_machine(path)
        if machine != ELF_MACHINES[args.arch]:
            what = "not a 64-bit little-endian ELF file"
            if machine is not None:
                what = f"ELF machine {machine}"
            raise Refused(
                f"plugins/{path.name} is {what}, not {ARCHES[args.arch]} "
                f"(ELF machine {ELF_MACHINES[args.arch]})"
            )
        counted += 1
    print(f"{counted} files for {args.arch}")
    return counted


def elf_machine(path: Path) -> int | None:
    """The e_machine of a 64-bit little-endian ELF file, or None if it is not one."""
    with path.open("rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    return int.from_bytes(head[18:20], "little")


# --------------------------------------------------------------------------- pack


def bundled_files(src: Path) -> list[Path]:
    """What goes into the archive: every part's files and directories, without apt's partial/
    and lock, nor the role's bookkeeping (dotfiles)."""
    files = []
    for part in PARTS:
        if not (src / part).is_dir():
            continue
        for path in (src / part).rglob("*"):
            rel = path.relative_to(src)
            if any(p.startswith(".") or p == "partial" for p in rel.parts) or rel.name == "lock":
                continue
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(src).parts)


def pack(args: argparse.Namespace) -> bool:
    """Write the archive and its sha256 when the bundled files changed; True when it did."""
    src: Path = args.src
    archive: Path = args.archive
    files = bundled_files(src)
    manifest = hashlib.sha256(args.arch.encode())
    for path in files:
        if path.is_dir():
            continue
        st = path.stat()
        manifest.update(f"{path.relative_to(src)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    packed = src / ".packed"
    sha_file = archive.with_name(archive.name + ".sha256")
    current = manifest.hexdigest()
    done = packed.read_text().strip() if packed.exists() else ""
    if archive.exists() and sha_file.exists() and done == current:
        return False
    tmp = archive.with_name(archive.name + ".tmp")

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for part in PARTS:
            if (src / part).is_dir():
                tar.add(src / part, arcname=part, recursive=False, filter=normalise)
        for path in files:
            tar.add(path, arcname=str(path.relative_to(src)), recursive=False, filter=normalise)
    digest = hashlib.sha256()
    with tmp.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    tmp.replace(archive)
    sha_file.write_text(f"{digest.hexdigest()}  {archive.name}\n")
    packed.write_text(current + "\n")
    return True


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--arch", required=True, choices=sorted(ARCHES))
    common.add_argument("--python", default="3.11", help="the target's CPython version")
    common.add_argument("--glibc", default="2.36", help="the target's glibc version")
    p_w = sub.add_parser("wheels", parents=[common])
    p_w.add_argument("--dest", type=Path, required=True)
    p_w.add_argument("--glue-wheel", type=Path, required=True)
    p_w.add_argument("--pip-arg", action="append", default=[], metavar="ARG")
    p_w.add_argument("requirements", nargs="+")
    p_c = sub.add_parser("check", parents=[common])
    p_c.add_argument("dir", type=Path)
    p_p = sub.add_parser("pack", parents=[common])
    p_p.add_argument("--src", type=Path, required=True)
    p_p.add_argument("--archive", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "wheels":
            print("changed" if fetch_wheels(args) else "unchanged")
        elif args.cmd == "check":
            check(args)
        else:
            print("changed" if pack(args) else "unchanged")
    except Refused as exc:
        print(f"fieldgate_bundle: {exc}", file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
