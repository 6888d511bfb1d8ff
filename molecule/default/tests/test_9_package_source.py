"""The fieldgate_offline role notices a package source changed by hand and puts it right.

An idempotent run only reads the bundle's package source in one probe (the checksum of the
unpacked bundle, the apt source, whether apt has read the bundle's lists). Here the apt source
is edited and the lists apt read from it are removed on gw2; the gateway play, run from the
control node for that role alone (`--tags offline`), must report the change and leave the
source and the lists as before; run again, it changes nothing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import get_host

REPO = Path(__file__).resolve().parents[3]
SOURCE = "/etc/apt/sources.list.d/fieldgate-bundle.list"
LISTS = "/var/lib/apt/lists/*fieldgate-bundle_debs*Packages*"


def _offline_play() -> str:
    """The gateway play for gw2, the fieldgate_offline role only; its recap line for gw2."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    cmd = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"],
           str(REPO / "playbooks/gateways.yml"), "--limit", "gw2", "--tags", "offline"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    (recap,) = [line for line in p.stdout.splitlines() if line.startswith("gw2 ")]
    return recap


def test_a_package_source_changed_by_hand_is_put_right() -> None:
    gw = get_host("gw2")
    source = gw.file(SOURCE).content_string
    assert gw.run(f"ls {LISTS}").rc == 0
    assert gw.run(f"echo 'deb http://deb.example.invalid/ ./' >> {SOURCE} && rm -f {LISTS}").rc == 0

    recap = _offline_play()
    assert " changed=0 " not in recap and " failed=0 " in recap, recap
    assert gw.file(SOURCE).content_string == source
    assert gw.run(f"ls {LISTS}").rc == 0

    recap = _offline_play()
    assert " changed=0 " in recap and " failed=0 " in recap, recap
