"""The shapes of names: one definition for the glue, the hub and the Ansible roles.

``PATTERNS`` holds plain regular expressions (Python ``re`` syntax, which Jinja's
``match`` test also uses), so the roles' validation can be generated from this module.

- ``name``: gateway serials, device serials and aliases, the MQTT topic prefix and client
  id, poll node names, the upload ``type``. They become MQTT topic levels and parts of file
  names (batch zips, USB exports on FAT drives), so no ``/``, ``+``, ``#``, spaces, and no
  ``:`` (which FAT forbids in file names).
- ``metric``: metric names. They never name files; devices use ``:`` and ``%`` in them
  (Shelly's ``temperature:0.tC``), so both are allowed.
- ``batch_id``: what the hub accepts as a batch id (gateways send
  ``<sequence>-<UTC time>``).
"""

from __future__ import annotations

import re

PATTERNS: dict[str, str] = {
    "name": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
    "metric": r"^[A-Za-z0-9_][A-Za-z0-9_.:%-]{0,63}$",
    "batch_id": r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
}

#: What each pattern allows, in words, for error messages.
ALLOWED: dict[str, str] = {
    "name": "letters, digits, _ . -",
    "metric": "letters, digits, _ . : % -",
    "batch_id": "letters, digits, _ . : -",
}

NAME_RE = re.compile(PATTERNS["name"])
METRIC_RE = re.compile(PATTERNS["metric"])
BATCH_ID_RE = re.compile(PATTERNS["batch_id"])
# Python's ``$`` also matches before a final line break: check whole strings with
# ``fullmatch`` ("GW-1\n" is not a name).


def is_name(value: object) -> bool:
    """Whether ``value`` is a string that may serve as a serial, alias, prefix or id."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None
