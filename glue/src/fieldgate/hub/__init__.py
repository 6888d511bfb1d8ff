"""The reference hub: the central receiver gateways upload their batches to (docs/contract.md §6).

``storage`` is the backend-neutral interface to the hub's database (``sqlite_storage`` the
SQLite backend, ``backends.open_storage`` the choice); ``app`` the Flask application with its
blueprints (``uploads``, ``fleet``; ``web`` what views share); ``server`` runs it under
gunicorn (the ``hub`` extra); ``imports`` is ``fieldgate hub import``. The ``fieldgate hub``
commands themselves are in :mod:`fieldgate.cli.hub`.
"""
