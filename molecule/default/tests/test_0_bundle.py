"""The offline bundles prepare built, checked per architecture on the control node.

prepare.yml runs playbooks/bundle.yml for every architecture of fieldgate_bundle_architectures
(amd64, arm64); the role checks each file as it builds. This test reads what a host really
receives, the packed archive: every wheel is for the architecture's machine or pure Python
(none-any), every .deb is of the architecture or `all`, the glue wheel is there once, the
arrival-stamp plugin is there once as an ELF file for the machine, and the archive matches
the sha256 a host compares. No test host is needed (the molecule/arm64
scenario runs it too, beside its emulated arm64 gateway).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# The bundle directory of the run (group_vars/all.yml: molecule.sh's, else .bundle).
BUNDLE = Path(os.environ.get("FIELDGATE_MOLECULE_BUNDLE_DIR") or REPO / ".bundle")
# dpkg architecture -> the machine in wheel platform tags (and in `uname -m`)
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
# dpkg architecture -> e_machine of its 64-bit little-endian ELF files (EM_X86_64, EM_AARCH64)
ELF_MACHINES = {"amd64": 62, "arm64": 183}


def archive_sha256(arch: str) -> str:
    """The sha256 the bundle role wrote beside the architecture's archive."""
    return (BUNDLE / f"fieldgate-bundle-{arch}.tar.sha256").read_text().split()[0]


def wheel_platforms(name: str) -> set[str]:
    """The platform tags of a wheel file name (compressed tag sets split)."""
    return set(name.removesuffix(".whl").rsplit("-", maxsplit=1)[-1].split("."))


def deb_architectures(paths: list[Path]) -> dict[str, str]:
    """Each .deb's Architecture field, read with dpkg-deb."""
    return {
        path.name: subprocess.run(
            ["dpkg-deb", "--field", str(path), "Architecture"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        for path in paths
    }  # fmt: skip


@pytest.mark.parametrize("arch", sorted(MACHINES))
def test_bundle_holds_only_files_of_its_architecture(arch: str, tmp_path: Path) -> None:
    machine = MACHINES[arch]
    archive = BUNDLE / f"fieldgate-bundle-{arch}.tar"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == archive_sha256(arch)
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    assert {n.split("/")[0] for n in names} == {"debs", "wheels", "plugins"}, names
    wheels = [n.removeprefix("wheels/") for n in names if n.startswith("wheels/")]
    debs = [n.removeprefix("debs/") for n in names if n.startswith("debs/")]
    assert set(debs) - {"Packages"} == {n for n in debs if n.endswith(".deb")}, debs
    glue = [n for n in wheels if n.startswith("fieldgate-")]
    assert len(glue) == 1, glue
    assert glue[0].endswith("-py3-none-any.whl"), glue
    for name in wheels:
        assert name.endswith(".whl"), name
        plats = wheel_platforms(name)
        assert plats == {"any"} or all(p.endswith(f"_{machine}") for p in plats), name
        if plats != {"any"}:  # compiled: CPython 3.11's own ABI or the stable one
            assert name.split("-")[-2] in ("cp311", "abi3"), name
    compiled = [n for n in wheels if wheel_platforms(n) != {"any"}]
    assert compiled, "no compiled wheel (PyYAML, MarkupSafe, charset-normalizer) in the bundle"
    deb_files = [n for n in debs if n.endswith(".deb")]
    assert len(deb_files) > 100, deb_files  # mosquitto, shorewall, supervisor, ... and deps
    plugins = [n.removeprefix("plugins/") for n in names if n.startswith("plugins/")]
    assert len(plugins) == 1, plugins
    assert plugins[0].startswith("fieldgate_stamp-") and plugins[0].endswith(".so"), plugins
    with tarfile.open(archive) as tar:  # the packed files, not the directory packed from
        head = tar.extractfile(f"plugins/{plugins[0]}").read(20)  # type: ignore[union-attr]
        tar.extractall(tmp_path, members=[m for m in tar if m.name.endswith(".deb")], filter="data")
    # ELF magic, 64-bit, little-endian, e_machine of the architecture
    assert head[:6] == b"\x7fELF\x02\x01", head
    assert int.from_bytes(head[18:20], "little") == ELF_MACHINES[arch], head
    found = deb_architectures(sorted((tmp_path / "debs").glob("*.deb")))
    assert len(found) == len(deb_files)
    wrong = {name: a for name, a in found.items() if a not in (arch, "all")}
    assert not wrong, wrong
    print(
        f"{arch}: {len(deb_files)} debs ({sum(a == 'all' for a in found.values())} all), "
        f"{len(wheels)} wheels ({len(compiled)} compiled), {archive.stat().st_size / 1e6:.1f} MB"
    )
