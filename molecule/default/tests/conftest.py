"""Fixtures of the default scenario's testinfra tests (helpers live in support.py)."""

from __future__ import annotations

from typing import Any

import pytest
from support import get_host, run_state


@pytest.fixture(scope="session")
def net() -> dict[str, Any]:
    return run_state()


@pytest.fixture(scope="session")
def sensor() -> Any:
    return get_host("sensor")


@pytest.fixture(scope="session")
def hub() -> Any:
    return get_host("hub")
