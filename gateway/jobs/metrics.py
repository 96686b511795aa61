"""Prometheus metrics of jobs, on the registry of the process's other metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["JobMetrics"]


class JobMetrics:
    """Jobs submitted, finished and running in this process; long polls waiting."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.submitted = Counter(
            "gateway_jobs_submitted",
            "Jobs accepted by POST /jobs on this replica, by kind.",
            ["kind"],
            registry=registry,
        )
        self.finished = Counter(
            "gateway_jobs_finished",
            "Jobs this process ran to a final state, by kind and state.",
            ["kind", "state"],
            registry=registry,
        )
        self.cancels = Counter(
            "gateway_jobs_cancel_requests",
            "DELETE /jobs/{id} requests that cancelled a job or asked it to stop.",
            registry=registry,
        )
        self.running = Gauge(
            "gateway_jobs_running",
            "Jobs running in this process's worker pool now.",
            registry=registry,
        )
        self.long_polls = Gauge(
            "gateway_long_polls",
            "Long polls (GET /jobs/{id}?wait=N) waiting on this replica now.",
            registry=registry,
        )
        self.claimed = Counter(
            "gateway_jobs_claimed",
            "Jobs this process took over from a worker that stopped answering.",
            registry=registry,
        )
