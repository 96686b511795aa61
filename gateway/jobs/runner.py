"""The worker pool: takes jobs from the store and runs them, a few at a time.

Every change of a job's record is published as an event on ``jobs/<id>`` through
the process's publish path (``Runtime.publish``), so WebSocket and MQTT clients see
the job move exactly as pollers of ``GET /jobs/{id}`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from gateway.errors import GatewayError, Unavailable
from gateway.events.envelope import Draft, Event
from gateway.jobs.kinds import JobCancelled, JobFailed, JobKind, KindRegistry
from gateway.jobs.metrics import JobMetrics
from gateway.jobs.model import Job, JobState
from gateway.jobs.store import Delivery, JobStore, Lease, LeaseLost

__all__ = ["Publish", "WorkerPool", "publish_change"]

logger = logging.getLogger(__name__)

Publish = Callable[[Sequence[Draft]], Awaitable[list[Event]]]

#: Event type published for each state a change leaves the job in.
EVENT_TYPES = {
    JobState.QUEUED: "JOB_QUEUED",
    JobState.SUCCEEDED: "JOB_SUCCEEDED",
    JobState.FAILED: "JOB_FAILED",
    JobState.CANCELLED: "JOB_CANCELLED",
}
_RUNNING = frozenset({JobState.RUNNING})
_STARTABLE = frozenset({JobState.QUEUED, JobState.RUNNING})


async def publish_change(publish: Publish, job: Job, event_type: str) -> None:
    """Publish a job's new public state on its topic.

    The record is what clients poll, so an event that cannot be published (a full
    fan-out backlog, Redis away) is logged and skipped rather than failing the job.
    """
    draft = Draft(job.topic, "jobs", event_type, job.public())
    try:
        await publish([draft])
    except GatewayError as exc:
        logger.warning("event %s of job %s not published: %s", event_type, job.id, exc)


class _Abandon(Exception):
    """The job left the running state under the worker (expired, or taken over)."""


class _Run:
    """One run of one job: the ``Progress`` its kind reports through."""

    def __init__(
        self, pool: WorkerPool, job: Job, steps: Sequence[str], lease: Lease
    ) -> None:
        self.pool = pool
        # The record as this run last wrote it.
        self.job = job
        self.steps = list(steps)
        self.lease = lease
        # Index of the step the kind must start next.
        self.next_step = 0

    async def step(self, name: str) -> None:
        index = self.next_step
        if index >= len(self.steps) or self.steps[index] != name:
            raise RuntimeError(f"step {name!r} out of order; expected {self.steps}")
        # A cancel may have come through another replica since the last write.
        current = await self.pool.store.get(self.job.id)
        if current is None or current.cancel_requested:
            raise JobCancelled
        self.next_step += 1
        progress = max(self.job.progress, 100 * index // len(self.steps))
        await self.change(
            {"step": name, "step_index": index, "progress": progress},
            "JOB_PROGRESSED",
        )

    async def advance(self, fraction: float) -> None:
        done = self.next_step - 1 + min(max(fraction, 0.0), 1.0)
        progress = min(99, math.floor(100 * done / len(self.steps)))
        if progress > self.job.progress:
            await self.change({"progress": progress}, "JOB_PROGRESSED")

    async def change(self, changes: Mapping[str, Any], event_type: str) -> None:
        update = await self.pool.store.update(
            self.job.id, changes, when=_RUNNING, lease=self.lease
        )
        if update is None or not update.applied:
            raise _Abandon
        self.job = update.job
        await publish_change(self.pool.publish, self.job, event_type)


class WorkerPool:
    """Runs queued jobs, at most ``concurrency`` at once, until closed.

    One feeder task takes jobs from the store when a slot is free, and every job
    runs in a task of its own. With a store shared between processes (Redis), the
    feeder also takes over jobs whose worker stopped answering.
    """

    def __init__(
        self,
        *,
        store: JobStore,
        kinds: KindRegistry,
        publish: Publish,
        metrics: JobMetrics,
        concurrency: int,
        name: str,
        claim_after: float,
    ) -> None:
        """Create a pool; nothing runs before ``start``.

        Args:
            store: where jobs come from and are recorded.
            kinds: the job kinds this process can run.
            publish: the publish path for job events.
            metrics: counters and gauges of jobs.
            concurrency: most jobs running at once.
            name: this process's name, written in the records it runs.
            claim_after: seconds a job's worker may stay silent before another
                worker takes the job over; the lease lasts half of it.
        """
        self.store = store
        self.kinds = kinds
        self.publish = publish
        self.metrics = metrics
        self.concurrency = concurrency
        self.name = name
        self.claim_after = claim_after
        self.lease_ttl = claim_after / 2
        # The tasks of the jobs running now; never more than ``concurrency``.
        self._running: set[asyncio.Task[None]] = set()
        # Set when a running job ends, so that the feeder takes another.
        self._slot_freed = asyncio.Event()
        self._feeder: asyncio.Task[None] | None = None

    @property
    def running(self) -> int:
        """Jobs running in this pool now."""
        return len(self._running)

    def start(self) -> None:
        """Start taking jobs."""
        self._feeder = asyncio.get_running_loop().create_task(self._feed())
        logger.info(
            "job worker pool %s started: %d at once, kinds %s",
            self.name,
            self.concurrency,
            ", ".join(self.kinds.names()),
        )

    async def close(self, grace: float) -> None:
        """Stop taking jobs; wait up to ``grace`` seconds for running ones.

        Jobs still running then are abandoned: with Redis another worker takes
        them over once their lease has expired.
        """
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        if self._running:
            logger.info("waiting up to %.1f s for %d jobs", grace, len(self._running))
            await asyncio.wait(self._running, timeout=grace)
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(self._running)

    async def _feed(self) -> None:
        """Take jobs whenever a slot is free; retry quietly while Redis is away."""
        claim_every = max(0.2, self.claim_after / 4)
        next_claim = time.monotonic()
        outage = False
        while True:
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                deliveries: list[Delivery] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + claim_every
                    deliveries = await self.store.reclaim(free, self.claim_after)
                if not deliveries:
                    deliveries = await self.store.take(free, min(1.0, claim_every))
            except Unavailable as exc:
                if not outage:
                    logger.warning("cannot take jobs: %s", exc)
                outage = True
                await asyncio.sleep(1.0)
                continue
            if outage:
                logger.warning("taking jobs again")
                outage = False
            for delivery in deliveries:
                self._launch(delivery)

    def _launch(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._run(delivery))
        self._running.add(task)
        self.metrics.running.inc()

        def done(task: asyncio.Task[Any]) -> None:
            self._running.discard(task)
            self.metrics.running.dec()
            self._slot_freed.set()
            if not task.cancelled() and task.exception() is not None:
                logger.error(
                    "running job %s failed", delivery.job_id, exc_info=task.exception()
                )

        task.add_done_callback(done)

    async def _run(self, delivery: Delivery) -> None:
        """Run one delivered job under its lease, then acknowledge it."""
        try:
            await self._run_delivered(delivery)
        except Unavailable as exc:
            # The entry stays in the queue; a worker takes it over later.
            logger.warning("job %s left for later: %s", delivery.job_id, exc)

    async def _run_delivered(self, delivery: Delivery) -> None:
        lease = await self.store.acquire(delivery, self.lease_ttl)
        if lease is None:
            # Its worker is alive after all; it acknowledges the entry itself.
            logger.debug("job %s is leased to another worker", delivery.job_id)
            return
        if delivery.claimed:
            self.metrics.claimed.inc()
            logger.info("took over job %s from a silent worker", delivery.job_id)
        try:
            finished = await self._run_leased(delivery, lease)
        except LeaseLost:
            finished = False
        finally:
            with contextlib.suppress(Unavailable):
                await self.store.release(lease)
        if finished:
            await self.store.done(delivery)

    async def _run_leased(self, delivery: Delivery, lease: Lease) -> bool:
        """Start, run and finish one job; False if it must stay in the queue."""
        # Only the lease holder writes the record, so reading the attempts
        # before writing them cannot race with another worker.
        update = await self.store.update(
            delivery.job_id,
            await self._start_changes(delivery.job_id),
            when=_STARTABLE,
            lease=lease,
        )
        if update is None or not update.applied:
            # Expired, cancelled while queued, or already done: nothing to run.
            return True
        job = update.job
        kind = self.kinds.get(job.kind)
        await publish_change(self.publish, job, "JOB_STARTED")
        if kind is None:
            await self._finish(job, lease, _failure("unknown_kind", job.kind))
            return True
        run = _Run(self, job, kind.steps(job.params), lease)
        return await self._work(kind, run)

    async def _start_changes(self, job_id: str) -> dict[str, Any]:
        job = await self.store.get(job_id)
        attempts = job.attempts if job is not None else 0
        return {
            "state": JobState.RUNNING,
            "started_at": time.time(),
            "progress": 0,
            "step": None,
            "step_index": 0,
            "attempts": attempts + 1,
            "worker": self.name,
        }

    async def _work(self, kind: JobKind, run: _Run) -> bool:
        """Run the kind's code with the lease kept alive; record how it ended."""
        work = asyncio.get_running_loop().create_task(kind.run(run.job.params, run))
        keeper = asyncio.get_running_loop().create_task(self._keep(run.lease, work))
        changes: dict[str, Any]
        try:
            result = await work
            changes = {"state": JobState.SUCCEEDED, "progress": 100, "result": result}
        except JobCancelled:
            changes = {"state": JobState.CANCELLED}
        except JobFailed as exc:
            changes = _failure(exc.code, str(exc))
        except (_Abandon, LeaseLost):
            logger.warning("job %s was taken from this worker; stopped", run.job.id)
            return False
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if run.lease.lost and task is not None and not task.cancelling():
                logger.warning("lease of job %s lost; stopped", run.job.id)
                return False
            raise
        except Exception:
            # A bug in the job kind: the client learns that the job failed.
            logger.exception("job %s of kind %s crashed", run.job.id, kind.name)
            changes = _failure("crashed", f"the {kind.name} job failed unexpectedly")
        finally:
            keeper.cancel()
        try:
            await self._finish(run.job, run.lease, changes)
        except _Abandon:
            return False
        return True

    async def _finish(self, job: Job, lease: Lease, changes: dict[str, Any]) -> None:
        update = await self.store.update(
            job.id, {**changes, "finished_at": time.time()}, when=_RUNNING, lease=lease
        )
        if update is None or not update.applied:
            raise _Abandon
        state = update.job.state
        self.metrics.finished.labels(job.kind, state.value).inc()
        logger.debug("job %s %s", job.id, state.value)
        await publish_change(self.publish, update.job, EVENT_TYPES[state])

    async def _keep(self, lease: Lease, work: asyncio.Task[Any]) -> None:
        """Renew the lease every third of its life; stop the work if it is lost."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                held = await self.store.renew(lease, self.lease_ttl)
            except Unavailable as exc:
                # Retried at the next tick; the lease outlives two failures.
                logger.warning("renewing the lease of job %s: %s", lease.job_id, exc)
                continue
            if not held:
                lease.lost = True
                work.cancel()
                return


def _failure(code: str, message: str) -> dict[str, Any]:
    if code == "unknown_kind":
        message = f"no job kind {message!r} in this worker"
    return {"state": JobState.FAILED, "error": {"code": code, "message": message}}
