"""The reference hub: the central receiver gateways upload their batches to (docs/contract.md §6).

``app`` is the Flask application, ``storage`` the database behind a small interface,
``cli`` the ``fieldgate hub`` commands (a gunicorn server, PINs, imports).
"""
