"""``gateway worker``: a process that runs jobs from the Redis queue, without HTTP.

It is a replica without listeners: the same runtime as ``gateway serve`` (Redis
backend, and an MQTT bridge when a broker URL is set), so the events of the jobs
it runs go through the same publish path and reach WebSocket subscribers on every
replica (Redis pub/sub) and MQTT subscribers (its own bridge).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from gateway.config import Settings
from gateway.jobs.service import JobService
from gateway.runtime import Runtime

__all__ = ["run_worker"]

logger = logging.getLogger(__name__)


async def run_worker(settings: Settings) -> None:
    """Run jobs until SIGTERM or SIGINT, then let running ones finish a moment.

    Jobs still running after half of ``shutdown_timeout`` are abandoned; another
    worker takes them over once their lease expires.

    Raises:
        Unavailable: Redis cannot be reached at start.
    """
    from gateway.server import make_backend

    runtime = Runtime(settings, make_backend(settings))
    await runtime.start()
    try:
        jobs = JobService.from_settings(
            settings,
            publish=runtime.publish,
            metrics=runtime.metrics,
            expire_topic=runtime.backend.expire_topic,
        )
        await jobs.start()
        try:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            logger.info("stopping: no new jobs taken")
        finally:
            await jobs.close()
    finally:
        await runtime.close()
    logger.info("worker %s stopped", settings.replica)
