"""``fieldgate hub import``: ingest an exported gateway database into the hub's storage.

The export is validated and read by :mod:`fieldgate.exportdb` (as ``restore`` does) and
stored with :meth:`~fieldgate.hub.storage.HubStorage.ingest` under the site serial the file
records: exactly once, like uploads. Each import is a batch of its own
(``import-<file>@<time>``), so importing a file again records a batch with no new readings.
"""

from __future__ import annotations

from fieldgate.exportdb import ExportInfo, iter_readings, readable_copy
from fieldgate.hub.storage import HubStorage
from fieldgate.store import now_ms


def import_export(st: HubStorage, info: ExportInfo) -> int:
    """Ingest a validated export (:func:`fieldgate.exportdb.inspect_export`); how many
    readings were new."""
    with readable_copy(info) as db:
        rows = (r for chunk in iter_readings(db) for r in chunk)
        new = st.ingest(
            info.site_serial,
            f"import-{info.path.name}@{now_ms()}",
            rows,
            manifest={"type": "import", "mode": "LIVE", "file": str(info.path)},
        )
    return new or 0
