"""Fixtures for every test: see support.py."""

from support import config_file, hub, mosquitto

__all__ = ["config_file", "hub", "mosquitto"]
