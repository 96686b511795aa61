"""Readings of one benchmark phase: clocks, CPU, memory, latency and losses.

CPU and memory are read from outside the server's processes through psutil and,
for a configuration of several processes, summed over them; with a broker, the
gateway's and the broker's shares are also kept apart. The gateway's MQTT bridge
counters come from its ``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time

import psutil

from clients._servers import HOST, Deployment
from clients._wire import Tally

__all__ = ["Readings", "bridge_counters", "phase_metrics"]

#: The bridge's counters in ``/metrics``, and their names in the results.
_BRIDGE_COUNTERS = {
    b"gateway_mqtt_published_total": "bridge_published",
    b"gateway_mqtt_dropped_total": "bridge_dropped",
    b"gateway_mqtt_failures_total": "bridge_failures",
}
#: Seconds allowed to read ``/metrics``.
_METRICS_TIMEOUT = 10.0


@dataclasses.dataclass
class Readings:
    """Clock and CPU readings taken at the start or end of a phase.

    CPU times are seconds as (user, system); ``server`` sums every process of
    the configuration; ``machine`` is the CPU time the whole machine was busy:
    every process, interrupts, and time stolen by the hypervisor.
    """

    at: float
    server: tuple[float, float]
    client: tuple[float, float]
    machine: float
    #: ``server`` split by role (``gateway``, ``broker``, ``baseline``).
    roles: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    @classmethod
    def take(cls, server: Deployment) -> Readings:
        """Read the clocks now."""
        own = os.times()
        machine = psutil.cpu_times()
        idle = machine.idle + getattr(machine, "iowait", 0.0)
        # Guest time is already counted in user time on Linux.
        guest = getattr(machine, "guest", 0.0) + getattr(machine, "guest_nice", 0.0)
        busy = sum(machine) - idle - guest
        roles = server.cpu_by_role()
        total = (
            sum(part[0] for part in roles.values()),
            sum(part[1] for part in roles.values()),
        )
        return cls(
            time.perf_counter(), total, (own.user, own.system), busy, roles=roles
        )


def _cpu_metrics(
    prefix: str, before: tuple[float, float], after: tuple[float, float], count: int
) -> dict[str, float]:
    user = after[0] - before[0]
    system = after[1] - before[1]
    total = user + system
    return {
        f"{prefix}_cpu_us_per_delivery": total * 1e6 / count if count else math.nan,
        f"{prefix}_sys_share": system / total if total else math.nan,
    }


def _other_cores(start: Readings, end: Readings) -> float:
    # What the rest of the machine used while the phase ran, in cores. It
    # includes interrupt work not charged to either side, some of which is
    # this benchmark's own loopback traffic, and for Redis-backed
    # configurations the Redis server's work.
    ours = sum(end.server) - sum(start.server) + sum(end.client) - sum(start.client)
    return (end.machine - start.machine - ours) / max(end.at - start.at, 1e-9)


def phase_metrics(
    server: Deployment, tally: Tally, start: Readings, expected: int
) -> dict[str, float]:
    """Sum up one phase: rate, CPU per delivery, latency, losses, memory.

    A delivery lost is one owed and never read; a duplicate, one read again by
    the same subscriber. Rates and CPU count every delivery read, duplicates
    included, since the server did that work.
    """
    end = Readings.take(server)
    received = tally.received
    seconds = max(tally.last_at - start.at, 1e-9)
    latencies = sorted(tally.latencies)
    parts: dict[str, float] = {}
    if server.mqtt is not None:
        # Where the server's CPU went: the gateway (ingest and bridge) and the
        # broker (the fan-out itself), each per delivery.
        for role, times in end.roles.items():
            before = start.roles.get(role, (0.0, 0.0))
            parts.update(_cpu_metrics(role, before, times, received))
        parts["marked_dup"] = tally.marked_dup
    return {
        **parts,
        **_cpu_metrics("server", start.server, end.server, received),
        **_cpu_metrics("client", start.client, end.client, received),
        "other_cores": _other_cores(start, end),
        "expected": expected,
        "received": received,
        "duplicates": tally.duplicates,
        "lost": expected - tally.unique,
        "closed": sum(tally.closes.values()),
        "seconds": seconds,
        "deliveries_per_s": received / seconds,
        "p50_ms": _quantile(latencies, 0.50) * 1e3,
        "p99_ms": _quantile(latencies, 0.99) * 1e3,
        "max_ms": _quantile(latencies, 1.0) * 1e3,
        "server_rss_mb": server.rss_bytes() / 2**20,
    }


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bridge_counters(server: Deployment) -> dict[str, float]:
    """The MQTT bridge's counters from the first gateway's ``/metrics``.

    Empty for a configuration without a broker.

    Raises:
        OSError: the gateway could not be reached.
        TimeoutError: it did not answer within ``_METRICS_TIMEOUT`` s.
    """
    if server.mqtt is None:
        return {}
    async with asyncio.timeout(_METRICS_TIMEOUT):
        reader, writer = await asyncio.open_connection(HOST, server.publish_port)
        try:
            writer.write(
                f"GET /metrics HTTP/1.1\r\nHost: {HOST}:{server.publish_port}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            text = await reader.read()
        finally:
            writer.close()
    counters = {}
    for line in text.splitlines():
        name, _, value = line.partition(b" ")
        if name in _BRIDGE_COUNTERS:
            counters[_BRIDGE_COUNTERS[name]] = float(value)
    return counters
