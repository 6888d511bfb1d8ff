"""USB export: ``fieldgate usb-event`` (run by udev) and ``fieldgate usb-watch`` (daemon).

Three modules: :mod:`~fieldgate.usb.spool` (the events udev leaves for the daemon),
:mod:`~fieldgate.usb.blockdev` (drives, partitions, mounting, ``Password.txt``) and
:mod:`~fieldgate.usb.watcher` (the daemon: events in order, one drive at a time, the LED).

udev runs ``usb-event add|remove DEVNAME`` for every USB block partition. A udev RUN
program must be short-lived and may not mount, so it only drops one small file per event
into ``export.spool_dir`` (written under a temporary name and renamed: atomic) and exits.

``usb-watch`` (supervisor, root) takes the events in order. For an added partition it
examines the whole drive it belongs to (all its partitions, or the drive itself when it has
no partition table), one drive at a time, so a drive inserted during an export waits:

1. LED ``in_progress``;
2. ``blkid`` names the filesystem; ext2/3/4 are mounted by the kernel, vfat and exFAT by the
   kernel when it has them, else by FUSE (``fusefat -o rw+``, ``mount.exfat-fuse``); always
   ``nosuid,nodev,noexec`` on a private mount point under ``export.mount_dir``;
3. ``Password.txt`` at the root must equal the export password (read without following
   symlinks, compared in constant time, never logged); a partition without it, or with
   the wrong one, does not qualify and the next partition is tried;
4. on the first qualifying partition: free space, snapshot, config, checksums
   (:func:`fieldgate.export.export_to`, the snapshot in a child process running as the
   store's owner);
5. sync, unmount, LED ``success``; any failure: LED ``error`` and the cause in the log.

``success`` and ``error`` hold until the drive's remove event, then ``normal_operation``.
A remove event for the drive being exported aborts the export at once. Every step is one
line in ``export.log_file``.
"""
