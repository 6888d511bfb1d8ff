"""Which storage backend a ``--db`` value names: today a SQLite file path.

The web app and the ``fieldgate hub`` commands open their storage here and use only the
:class:`~fieldgate.hub.storage.HubStorage` interface, so a new backend (PostgreSQL, picked by
a ``postgresql://`` URL) is added in this one place.
"""

from __future__ import annotations

from fieldgate.hub.sqlite_storage import SqliteHubStorage
from fieldgate.hub.storage import HubStorage


def open_storage(db: str, *, create: bool = True) -> HubStorage:
    """The hub storage at ``db`` (a SQLite path), created and migrated when ``create``."""
    return SqliteHubStorage(db, create=create)
