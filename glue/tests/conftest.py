"""Fixtures for every test: see support.py."""

from support import config_file, hub, hub_db, mosquitto, pg_server

__all__ = ["config_file", "hub", "hub_db", "mosquitto", "pg_server"]
