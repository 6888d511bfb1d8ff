"""Fixtures for every test: see support.py (and browser.py for the page tests)."""

from browser import browser
from support import config_file, hub, hub_db, mosquitto, pg_server

__all__ = ["browser", "config_file", "hub", "hub_db", "mosquitto", "pg_server"]
