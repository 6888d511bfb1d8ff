"""USB export on gw1: a loop-backed ext4 drive with Password.txt, handed over as udev would."""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

from support import gateway_config, get_host, testnet, wait_for

TS = r"\d{8}T\d{6}\+0000"


@contextlib.contextmanager
def drive_mounted(device: str, readonly: bool):
    """Mount the drive image's loop device on this machine for a moment."""
    with tempfile.TemporaryDirectory(prefix="fg-usb-") as mnt:
        subprocess.run(["mount", "-o", "ro" if readonly else "rw", device, mnt], check=True)
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)


def udev_run_command(host, devnode: str) -> str:
    """The command the installed udev rule runs for this device (its RUN+= with %k expanded)."""
    rules = host.check_output("grep -l -s usb-event /etc/udev/rules.d/*.rules /lib/udev/rules.d/*.rules")
    text = host.file(rules.split()[0]).content_string
    run = re.search(r'RUN\+="([^"]*usb-event[^"]*)"', text)
    assert run, f"no RUN+= calling usb-event in {rules}"
    kernel = devnode.rsplit("/", 1)[1]
    cmd = run.group(1)
    for token, value in (("%k", kernel), ("$kernel", kernel), ("$devnode", devnode), ("%N", devnode),
                         ("$env{DEVNAME}", devnode), ("%E{DEVNAME}", devnode), ("$env{ACTION}", "add"),
                         ("%E{ACTION}", "add"), ("$action", "add")):  # fmt: skip
        cmd = cmd.replace(token, value)
    return cmd


def led(host, led_path: str) -> dict[str, str]:
    out = host.check_output(f"cd {shlex.quote(led_path)} && grep -H . trigger brightness delay_on delay_off 2>/dev/null || true")
    return dict(line.split(":", 1) for line in out.splitlines())


def test_export_to_usb_drive():
    gw = get_host("gw1")
    cfg = gateway_config(gw)
    serial = cfg["site"]["serial"]
    device = testnet()["hosts"]["gw1"]["usb"]["device"]
    password = gw.file(cfg["export"]["password_file"]).content_string.strip()
    log_file = cfg["export"].get("log_file", "/var/log/fieldgate/usb_exporter.log")
    led_path = cfg["export"]["led_path"]

    with drive_mounted(device, readonly=False) as mnt:
        (mnt / "Password.txt").write_text(f"  {password}\n")
        (mnt / "notes.txt").write_text("kept as it is\n")
    log_before = int(gw.check_output(f"cat {shlex.quote(log_file)} 2>/dev/null | wc -l"))

    assert gw.run(udev_run_command(gw, device)).rc == 0

    def new_log() -> list[str]:
        return gw.check_output(f"tail -n +{log_before + 1} {shlex.quote(log_file)}").splitlines()

    wait_for("the export to finish", lambda: any("led: success" in line for line in new_log()))
    state = led(gw, led_path)
    assert (state.get("trigger"), state.get("delay_on"), state.get("delay_off")) == ("timer", "250", "250"), state

    with drive_mounted(device, readonly=True) as mnt:
        names = sorted(p.name for p in mnt.iterdir() if p.name != "lost+found")
        assert (mnt / "notes.txt").read_text() == "kept as it is\n"
        db = [n for n in names if re.fullmatch(rf"data_store-{re.escape(serial)}-{TS}\.db", n)]
        site = [n for n in names if re.fullmatch(rf"site_config-{re.escape(serial)}-{TS}\.yaml", n)]
        sums = [n for n in names if re.fullmatch(rf"export-{re.escape(serial)}-{TS}\.sha256", n)]
        assert len(db) == len(site) == len(sums) == 1, names
        listed = {}
        for line in (mnt / sums[0]).read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            listed[name.lstrip("*")] = digest
        assert set(listed) == {db[0], site[0]}
        for name, digest in listed.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
        assert password not in (mnt / site[0]).read_text()
        check = subprocess.run(["sqlite3", "-readonly", str(mnt / db[0]), "PRAGMA integrity_check; SELECT COUNT(*) > 0 FROM readings;"],
                               capture_output=True, text=True, check=True)  # fmt: skip
        assert check.stdout.split() == ["ok", "1"]

    remove = udev_run_command(gw, device).replace(" add ", " remove ")
    assert gw.run(remove).rc == 0
    wait_for("the LED back to normal operation", lambda: led(gw, led_path).get("trigger") in ("none", None)
             and led(gw, led_path).get("brightness", "0") != "0")  # fmt: skip

    lines = new_log()
    order = [next((i for i, line in enumerate(lines) if f"led: {s}" in line), None)
             for s in ("in_progress", "success", "normal_operation")]  # fmt: skip
    assert None not in order and order == sorted(order), f"LED states in the log: {lines}"
