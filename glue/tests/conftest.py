"""Fixtures for every test: see support.py."""

from support import config_file, mosquitto

__all__ = ["config_file", "mosquitto"]
