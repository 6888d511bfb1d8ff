#!/usr/bin/env python3
"""A Modbus TCP device for the test hosts: pymodbus's own server serving known values.

Runs on the sensor host (prepare.yml installs it with the pymodbus wheel of the offline
bundle on PYTHONPATH: the test hosts have no way to PyPI). Serves one unit (``--unit``) whose
input registers hold float32 values, big word order, at the addresses of a JSON file
(``{"0": 230.1, "2": 229.8, ...}``), as an energy meter behind a Modbus TCP gateway would.

    PYTHONPATH=pymodbus-….whl python3 modbus_server.py --port 502 --unit 1 --values FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
from pathlib import Path


def input_registers(values: dict[int, float]) -> list[int]:
    """The input table from address 0 up: each value as two registers, high word first."""
    regs = [0] * (max(values) + 2)
    for address, value in values.items():
        raw = struct.pack(">f", value)
        regs[address] = int.from_bytes(raw[:2], "big")
        regs[address + 1] = int.from_bytes(raw[2:], "big")
    return regs


async def serve(port: int, unit: int, values: dict[int, float]) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    device = SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[0], datatype=DataType.REGISTERS)],
            [SimData(0, values=input_registers(values), datatype=DataType.REGISTERS)],
        ),
    )
    server = ModbusTcpServer(device, address=("0.0.0.0", port))  # noqa: S104 (the test LAN)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=502)
    ap.add_argument("--unit", type=int, default=1)
    ap.add_argument("--values", required=True, help="JSON file: address -> float32 value")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    values = {int(k): float(v) for k, v in json.loads(Path(args.values).read_text()).items()}
    asyncio.run(serve(args.port, args.unit, values))


if __name__ == "__main__":
    main()
