"""End to end: the sensor host publishes, the gateway stores, uploads, the hub holds it once."""

from __future__ import annotations

import pytest
from support import GATEWAYS, await_at_hub, count, send_readings


@pytest.mark.parametrize("gw", GATEWAYS)
def test_readings_reach_the_hub_exactly_once(sensor, hub, net, gw):
    sent = send_readings(sensor, net, gw, n=5, repeat=2)
    rows = await_at_hub(hub, sent)
    assert len(rows) == 10  # 5 readings x 2 metrics, although each was published twice
    assert rows[0] == {"metric": "rh", "ts": sent["base"], "value": 40.0}
    assert count(sent["host"], sent["db"], sent["where"]) == 10
    # The gateway knows they went up: each lies in the id range of a batch (docs/store.md).
    in_no_batch = " AND NOT EXISTS (SELECT 1 FROM batches b"
    in_no_batch += " WHERE readings.id BETWEEN b.first_id AND b.last_id)"
    assert count(sent["host"], sent["db"], sent["where"] + in_no_batch) == 0
