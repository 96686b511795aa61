"""How fast the MQTT bridge alone empties its buffer into a broker.

``python -m clients.bridge_bench`` starts a private Mosquitto on a free loopback
port, hands the gateway's ``MqttBridge`` a batch of events at once, and times it
until the broker has acknowledged every one, at QoS 0 and at QoS 1 (sent as QoS 2,
as the bridge does). No HTTP ingest, fan-out or subscriber shares the two cores, so
the figures are the bridge's own ceiling per replica; ``gateway fanout-bench
--servers gateway-mqtt`` measures the whole path.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

from clients._servers import BrokerOptions, _start_mosquitto
from gateway.events.envelope import Draft, encode
from gateway.metrics import Metrics
from gateway.transports.mqtt import MqttBridge, parse_qos_rules

logger = logging.getLogger(__name__)


async def _one_run(port: int, events: int, qos: int, pad: int) -> tuple[float, float]:
    """Events per second and CPU µs per event of one batch of ``events``."""
    bridge = MqttBridge(
        f"mqtt://127.0.0.1:{port}",
        metrics=Metrics(),
        client_id=f"bridge-bench-{qos}",
        buffer=events,
        qos_rules=parse_qos_rules(f"#={qos}"),
    )
    batch = [
        encode(
            Draft("bench/bridge", "bench", "TICK", {"n": n, "pad": "x" * pad})
        ).with_offset(n + 1)
        for n in range(events)
    ]
    bridge.start()
    try:
        # The bridge offers its state, not an event to wait on: polled.
        async with asyncio.timeout(10):
            while not bridge.connected:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        wall, cpu = time.perf_counter(), time.process_time()
        bridge.submit(batch)
        async with asyncio.timeout(max(60.0, events / 100)):
            while bridge.buffered():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await bridge.close(flush_within=1.0)
    return events / wall, cpu / events * 1e6


async def _bench(events: int, runs: int, pad: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as folder:
        broker = _start_mosquitto("mosquitto", Path(folder), BrokerOptions())
        try:
            for qos in (0, 1):
                results = [
                    await _one_run(broker.port, events, qos, pad) for _ in range(runs)
                ]
                rates = [rate for rate, _ in results]
                cpu = [micros for _, micros in results]
                print(
                    f"QoS {qos}: {statistics.median(rates):,.0f} events/s "
                    f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}), "
                    f"{statistics.median(cpu):.0f} µs of bridge CPU per event"
                )
        finally:
            broker.stop()


def main() -> None:
    """Parse the arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000, help="events per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per QoS; medians")
    parser.add_argument("--pad", type=int, default=200, help="characters of padding")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_bench(args.events, args.runs, args.pad))


if __name__ == "__main__":
    main()
