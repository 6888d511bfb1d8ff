"""Modbus TCP and RTU polling (``poll.modbus``, docs/contract.md §10); see docs/modbus.md.

- :mod:`fieldgate.modbus.registers`: value types, widths, what fits which table, map checks
  and decoding (pure; the configuration imports it, so it must not import pymodbus);
- :mod:`fieldgate.modbus.plan`: coalescing a register map into few read requests (pure);
- :mod:`fieldgate.modbus.client`: the serial lines' pymodbus client, failures classified;
- :mod:`fieldgate.modbus.tcploop`: every Modbus TCP bus driven by one selector thread;
- :mod:`fieldgate.modbus.poller`: a thread per serial line, schedules, backoff, the store;
- :mod:`fieldgate.modbus.report`: the per-device facts ``fieldgate status`` shows.
"""
