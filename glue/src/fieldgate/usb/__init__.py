"""USB export: ``fieldgate usb-event`` (run by udev) and ``fieldgate usb-watch`` (daemon).

udev runs ``usb-event add|remove DEVNAME`` for every USB block partition; it only records
the event (:mod:`~fieldgate.usb.spool`). ``usb-watch`` (supervisor, root) takes the events
in order and exports to the first partition of a drive that holds the right
``Password.txt`` (:mod:`~fieldgate.usb.watcher`), mounting it safely
(:mod:`~fieldgate.usb.blockdev`); the export itself is :mod:`fieldgate.export`.

This package imports nothing itself, so ``usb-event`` loads only the spool.
"""
