"""Real drives for the USB export tests: filesystem images on loop devices (needs root).

``drives`` (a fixture) makes images with ext4, FAT or exFAT,
optionally read-only, optionally backed through a FUSE pass-through (bindfs) that a test
can kill to make the device fail mid-write; every loop device, mount and helper process is
released by the finalizer, also when a test fails.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "open-sesame"  # what the config_file fixture writes into export_password


def run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def mounted(point: Path) -> bool:
    text = Path("/proc/self/mountinfo").read_text()
    return any(line.split()[4] == str(point) for line in text.splitlines())


@dataclass
class Drive:
    """One loop device holding a test drive."""

    image: Path
    loop: str  # /dev/loopN
    fstype: str

    @property
    def devname(self) -> str:
        return Path(self.loop).name


class Drives:
    """Factory and janitor for test drives."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.loops: list[str] = []
        self.points: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.count = 0

    # -- making drives

    def make(
        self,
        fstype: str = "ext4",
        *,
        size_mb: int = 64,
        files: dict[str, bytes | str] | None = None,
        readonly: bool = False,
        backing: Path | None = None,
    ) -> Drive:
        """A drive image with ``files`` at the root of every filesystem on it."""
        self.count += 1
        image = (backing or self.workdir) / f"drive{self.count}.img"
        with image.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        files = files or {}
        args = ["losetup", "--find", "--show"]
        if readonly:
            args.append("--read-only")
        if readonly:
            # A write-protected drive: the filesystem is made before the device is attached.
            self._mkfs(fstype, str(image), files)
        loop = run(*args, str(image)).strip()
        self.loops.append(loop)
        drive = Drive(image, loop, fstype)
        if not readonly:
            self._mkfs(fstype, loop, files)
        return drive

    def _mkfs(self, fstype: str, target: str, files: dict[str, bytes | str]) -> None:
        if fstype == "ext4":
            src = Path(tempfile.mkdtemp(dir=self.workdir))
            for name, data in files.items():
                (src / name).write_bytes(data.encode() if isinstance(data, str) else data)
            run("mkfs.ext4", "-q", "-F", "-d", str(src), target)
            return
        if fstype == "vfat":
            run("mkfs.vfat", target)
        elif fstype == "exfat":
            run("mkfs.exfat", target)
        else:
            raise ValueError(fstype)
        if files:
            with self.mount(target, fstype) as root:
                for name, data in files.items():
                    (root / name).write_bytes(data.encode() if isinstance(data, str) else data)

    # -- looking inside

    @contextlib.contextmanager
    def mount(self, target: str, fstype: str, *, readonly: bool = False) -> Iterator[Path]:
        """Mount a drive's filesystem for the test itself (ext4 kernel, FAT/exFAT FUSE)."""
        point = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.workdir))
        self.points.append(point)
        proc: subprocess.Popen[bytes] | None = None
        if fstype == "ext4":
            run("mount", "-t", "ext4", "-o", "ro" if readonly else "rw", target, str(point))
        elif fstype == "vfat":
            proc = subprocess.Popen(
                ["fusefat", "-f", "-o", "ro" if readonly else "rw+", target, str(point)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs.append(proc)
            deadline = time.monotonic() + 10
            while not mounted(point):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"fusefat did not mount {target}")
                time.sleep(0.05)
        else:
            run("mount.exfat-fuse", *(["-o", "ro"] if readonly else []), target, str(point))
        try:
            yield point
        finally:
            run("umount", str(point))
            if proc is not None:
                proc.wait(60)
            point.rmdir()

    def listing(self, drive: Drive) -> dict[str, bytes]:
        """Every file at the root of the drive's filesystem, with its content."""
        with self.mount(drive.loop, drive.fstype, readonly=True) as root:
            return {
                p.name: p.read_bytes()
                for p in root.iterdir()
                if p.is_file() and p.name != "lost+found"
            }

    # -- damaging what is on a drive

    def flip_byte(self, drive: Drive, needle: bytes, at: int) -> int:
        """Invert byte ``at`` of the one place where ``needle`` lies in the drive's image.

        The write goes to the image file, which is what the loop device reads: under every
        cache of the mounted filesystem and of the block device, as a failing drive would
        change it. Returns the byte's offset in the image.
        """
        with drive.image.open("r+b") as f, mmap.mmap(f.fileno(), 0) as image:
            where = image.find(needle)
            if where < 0 or image.find(needle, where + 1) >= 0:
                raise RuntimeError(f"the needle is not in {drive.image.name} exactly once")
            image[where + at] ^= 0xFF
            image.flush()
        return where + at

    # -- failing devices

    def passthrough(self) -> tuple[Path, Path, subprocess.Popen[bytes]]:
        """A directory served by bindfs (FUSE); killing the process fails every I/O below it."""
        lower = Path(tempfile.mkdtemp(prefix="lower-", dir=self.workdir))
        upper = Path(tempfile.mkdtemp(prefix="upper-", dir=self.workdir))
        proc = subprocess.Popen(
            ["bindfs", "-f", "--no-allow-other", str(lower), str(upper)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        self.points.append(upper)
        deadline = time.monotonic() + 10
        while not mounted(upper):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("bindfs did not mount")
            time.sleep(0.05)
        return upper, lower, proc

    # -- cleanup

    def cleanup(self) -> None:
        for point in reversed(self.points):
            if point.exists() and mounted(point):
                subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for loop in reversed(self.loops):
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def unmount_everything_under(directory: Path) -> None:
    """Detach any mount left under ``directory`` (a failed daemon's private mounts)."""
    text = Path("/proc/self/mountinfo").read_text()
    points = [line.split()[4] for line in text.splitlines()]
    for point in sorted((p for p in points if p.startswith(f"{directory}/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@pytest.fixture
def drives(tmp_path: Path) -> Iterator[Drives]:
    """Test drives on loop devices, all released afterwards."""
    if os.geteuid() != 0:
        raise RuntimeError("the USB export tests need root (loop devices and mounts)")
    factory = Drives(tmp_path / "drives")
    try:
        yield factory
    finally:
        unmount_everything_under(tmp_path)
        factory.cleanup()
