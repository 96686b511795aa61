"""The jobs of one process: submitting, reading, waiting on and cancelling them.

A ``JobService`` owns the store, the registry of job kinds and, when the process
runs workers, the worker pool. The gateway builds one in its lifespan and the HTTP
handlers use it; ``gateway worker`` builds one with a pool and no HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from gateway.config import Settings
from gateway.errors import Unavailable
from gateway.jobs.kinds import KindRegistry, load_kinds
from gateway.jobs.metrics import JobMetrics
from gateway.jobs.model import Job, JobState, new_job_id
from gateway.jobs.redis_store import RedisJobStore
from gateway.jobs.runner import ExpireTopic, Publish, WorkerPool, publish_change
from gateway.jobs.store import JobStore, MemoryJobStore
from gateway.metrics import Metrics

__all__ = ["JobService", "UnknownKind"]

logger = logging.getLogger(__name__)

_QUEUED = frozenset({JobState.QUEUED})
_RUNNING = frozenset({JobState.RUNNING})


class UnknownKind(LookupError):
    """``submit`` was given a kind that no plugin provides."""


class JobService:
    """Jobs as the HTTP API and the workers of one process see them."""

    def __init__(
        self,
        *,
        store: JobStore,
        kinds: KindRegistry,
        publish: Publish,
        metrics: JobMetrics,
        pool: WorkerPool | None,
        shutdown_grace: float = 5.0,
        expire_topic: ExpireTopic | None = None,
    ) -> None:
        """Wire a service from its parts; ``from_settings`` is the usual way."""
        self.store = store
        self.kinds = kinds
        self.publish = publish
        self.metrics = metrics
        self.pool = pool
        self._shutdown_grace = shutdown_grace
        # Gives a job's topic an end once the job is finished (or never made).
        self.expire_topic = expire_topic

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        publish: Publish,
        metrics: Metrics,
        workers: int | None = None,
        expire_topic: ExpireTopic | None = None,
    ) -> JobService:
        """The store, kinds and pool the settings ask for.

        Args:
            settings: the process's settings.
            publish: the publish path for job events (``Runtime.publish``).
            metrics: the process's metrics; job metrics join its registry.
            workers: jobs run at once by this process; ``job_workers`` if None.
            expire_topic: ``StateBackend.expire_topic`` of the backend ``publish``
                stores into; if None, finished jobs' topics keep their history.

        Raises:
            ValueError: a kind named in ``job_kinds`` cannot be loaded.
        """
        workers = settings.job_workers if workers is None else workers
        store: JobStore
        if settings.redis_url is None:
            store = MemoryJobStore(ttl=settings.job_ttl)
        else:
            store = RedisJobStore(
                settings.redis_url,
                prefix=settings.redis_prefix,
                consumer=settings.replica,
                ttl=settings.job_ttl,
                # One connection blocks on the queue; each running job needs one
                # at a time; long polls share the rest.
                connections=workers + 16,
            )
        kinds = load_kinds(settings.job_kinds)
        job_metrics = JobMetrics(metrics.registry)
        pool = None
        if workers > 0:
            pool = WorkerPool(
                store=store,
                kinds=kinds,
                publish=publish,
                metrics=job_metrics,
                concurrency=workers,
                name=settings.replica,
                claim_after=settings.job_claim_after,
                expire_topic=expire_topic,
            )
        return cls(
            store=store,
            kinds=kinds,
            publish=publish,
            metrics=job_metrics,
            pool=pool,
            shutdown_grace=settings.shutdown_timeout / 2,
            expire_topic=expire_topic,
        )

    async def start(self) -> None:
        """Connect the store and start the workers, if any.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        await self.store.start()
        if self.pool is not None:
            self.pool.start()

    async def close(self) -> None:
        """Stop the workers (running jobs get a grace period) and the store."""
        if self.pool is not None:
            await self.pool.close(self._shutdown_grace)
        await self.store.close()

    async def submit(self, kind_name: str, params: Mapping[str, Any]) -> Job:
        """Validate, announce, then record and queue a new job.

        The ``JOB_QUEUED`` event is published before the job is queued, so that
        no worker's ``JOB_STARTED`` can come before it on the job's topic. The
        record and its queue entry are written in one step, so there is never
        a record that no worker will run.

        Raises:
            UnknownKind: no kind is called ``kind_name``.
            BadRequest: the kind refused the parameters.
            Unavailable: Redis cannot be reached, or stalled; nothing was
                recorded. (Only when Redis ran the request and the answer alone
                was lost on the network is the job recorded and queued, and it
                runs like any other.) Its ``JOB_QUEUED`` event may have been
                published on the topic of that id, which nobody was given.
        """
        kind = self.kinds.get(kind_name)
        if kind is None:
            raise UnknownKind(kind_name)
        valid = kind.validate(params)
        now = time.time()
        job = Job(
            id=new_job_id(),
            kind=kind_name,
            params=valid,
            step_count=len(kind.steps(valid)),
            created_at=now,
            updated_at=now,
        )
        # Booked first: a create that a stalled Redis runs only after this call
        # gave up writes nothing.
        await self.store.reserve(job.id)
        await publish_change(self.publish, job, "JOB_QUEUED")
        try:
            await self.store.create(job)
        except Unavailable:
            # Nobody will hear of this id: its JOB_QUEUED need not outlive a
            # finished job's (when the backend answers; Redis may be away).
            await self._expire_topic(job)
            raise
        self.metrics.submitted.labels(kind_name).inc()
        logger.debug("job %s of kind %s queued", job.id, kind_name)
        return job

    async def get(self, job_id: str) -> Job | None:
        """The job's record, or None for an unknown or expired id."""
        return await self.store.get(job_id)

    async def wait_change(self, job_id: str, version: int, seconds: float) -> None:
        """Return when the job's record moves past ``version`` or after ``seconds``."""
        await self.store.wait_change(job_id, version, seconds)

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, or ask a running one to stop.

        A running job stops within about a second when its kind waits through
        ``Progress.sleep`` (``db-refresh`` does), otherwise at its next step
        boundary. A finished job is returned unchanged.

        Returns:
            The job's record after the request, or None for an unknown id.
        """
        now = time.time()
        update = await self.store.update(
            job_id, {"state": JobState.CANCELLED, "finished_at": now}, when=_QUEUED
        )
        if update is None:
            return None
        if update.applied:
            self.metrics.cancels.inc()
            self.metrics.finished.labels(update.job.kind, "cancelled").inc()
            await publish_change(self.publish, update.job, "JOB_CANCELLED")
            await self._expire_topic(update.job)
            return update.job
        if update.job.state is not JobState.RUNNING or update.job.cancel_requested:
            return update.job
        update = await self.store.update(
            job_id, {"cancel_requested": True}, when=_RUNNING
        )
        if update is not None and update.applied:
            self.metrics.cancels.inc()
            await publish_change(self.publish, update.job, "JOB_CANCEL_REQUESTED")
            return update.job
        # It finished between the two updates.
        return await self.store.get(job_id)

    async def _expire_topic(self, job: Job) -> None:
        """Give the topic of a job that will not change again the record's ttl."""
        if self.expire_topic is None:
            return
        try:
            await self.expire_topic(job.topic, self.store.ttl)
        except Unavailable as exc:
            logger.warning("topic of job %s left without an end: %s", job.id, exc)
