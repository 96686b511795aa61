"""The worker pool: takes jobs from the store and runs them, a few at a time.

Every change of a job's record is published as an event on ``jobs/<id>`` through
the process's publish path (``Runtime.publish``), so WebSocket and MQTT clients see
the job move exactly as pollers of ``GET /jobs/{id}`` do. Once a job is finished its
topic is given the record's time to live (``StateBackend.expire_topic``), so that
its events go when its record goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from gateway.errors import GatewayError, Unavailable
from gateway.events.envelope import Draft, Event
from gateway.jobs.kinds import JobCancelled, JobFailed, JobKind, KindRegistry
from gateway.jobs.metrics import JobMetrics
from gateway.jobs.model import Job, JobState
from gateway.jobs.store import Delivery, JobStore, Lease, LeaseLost, Update

__all__ = ["ExpireTopic", "Publish", "WorkerPool", "publish_change"]

logger = logging.getLogger(__name__)

Publish = Callable[[Sequence[Draft]], Awaitable[list[Event]]]
#: ``StateBackend.expire_topic``: forget a topic's history after some seconds.
ExpireTopic = Callable[[str, float], Awaitable[None]]

#: Seconds between two looks at a running job's record for a cancel request, so
#: that a cancel reaches a kind waiting in ``Progress.sleep`` within about this.
CANCEL_POLL = 0.5
#: Seconds between two tries of a record change while Redis is away.
RETRY_PAUSE = 0.5
_T = TypeVar("_T")

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
    """One run of one job: the ``Progress`` its kind reports through.

    While the store is away (Redis unreachable) the run's record writes wait
    for it to answer again, so that the job carries on at the step it was in,
    under the same attempt, instead of failing or starting over elsewhere.
    """

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
        # Set by the cancel watcher once a cancel request is seen; wakes ``sleep``.
        self.cancelled = asyncio.Event()
        # Whether the store is away for this run, so that an outage is logged
        # once however many of its tasks (kind, lease keeper, watcher) meet it.
        self.store_away = False

    async def step(self, name: str) -> None:
        index = self.next_step
        if index >= len(self.steps) or self.steps[index] != name:
            raise RuntimeError(f"step {name!r} out of order; expected {self.steps}")
        # A cancel may have come through another replica since the watcher looked.
        job_id = self.job.id
        if self.cancelled.is_set() or await self.hold(
            lambda: self.pool.store.cancel_requested(job_id)
        ):
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

    async def sleep(self, seconds: float) -> None:
        if not self.cancelled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.cancelled.wait(), max(0.0, seconds))
        if self.cancelled.is_set():
            raise JobCancelled

    async def change(self, changes: Mapping[str, Any], event_type: str) -> None:
        job_id = self.job.id
        update = await self.hold(
            lambda: self.pool.store.update(
                job_id, changes, when=_RUNNING, lease=self.lease
            )
        )
        if update is None or not update.applied:
            raise _Abandon
        self.job = update.job
        await publish_change(self.pool.publish, self.job, event_type)

    async def hold(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, made again every ``RETRY_PAUSE`` seconds while Redis is away.

        ``LeaseLost`` passes through: another worker took the job meanwhile.
        Cancelling the wait is safe.
        """
        while True:
            try:
                result = await call()
            except Unavailable as exc:
                self.store_unreachable(exc)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            self.store_reachable()
            return result

    def store_unreachable(self, exc: Unavailable) -> None:
        """Note that Redis is away; the first time in an outage, log it."""
        if not self.store_away:
            self.store_away = True
            logger.warning(
                "job %s waits at step %s until redis answers: %s",
                self.job.id,
                self.job.step or "-",
                exc,
            )

    def store_reachable(self) -> None:
        """Note that Redis answers; after an outage, log it."""
        if self.store_away:
            self.store_away = False
            logger.info(
                "job %s carries on at step %s: redis answers again",
                self.job.id,
                self.job.step or "-",
            )


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
        expire_topic: ExpireTopic | None = None,
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
            expire_topic: gives a finished job's topic the store's ``ttl``; None
                leaves job topics for ever.
        """
        self.store = store
        self.kinds = kinds
        self.publish = publish
        self.metrics = metrics
        self.concurrency = concurrency
        self.name = name
        self.claim_after = claim_after
        self.lease_ttl = claim_after / 2
        self.expire_topic = expire_topic
        # The tasks of the jobs running now; never more than ``concurrency``.
        self._running: set[asyncio.Task[None]] = set()
        # The ids of those jobs, so that a job is never run twice here.
        self._job_ids: set[str] = set()
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
                # Every running job's entry goes idle while Redis is away, its
                # worker alive or not. Once Redis is back, leave the workers one
                # claim delay to renew their leases before taking jobs over.
                next_claim = time.monotonic() + self.claim_after
                await asyncio.sleep(1.0)
                continue
            if outage:
                logger.warning("taking jobs again")
                outage = False
            for delivery in deliveries:
                if delivery.job_id in self._job_ids:
                    # Its entry went idle during an outage, but the job still
                    # runs here, and its run renews the entry itself.
                    logger.debug("job %s runs here already", delivery.job_id)
                    continue
                self._launch(delivery)

    def _launch(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._run(delivery))
        self._running.add(task)
        self._job_ids.add(delivery.job_id)
        self.metrics.running.inc()

        def done(task: asyncio.Task[Any]) -> None:
            self._running.discard(task)
            self._job_ids.discard(delivery.job_id)
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
            # Before its run started, or acknowledging it: the entry stays in
            # the queue, and a worker takes the job over later.
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
        except (LeaseLost, _Abandon):
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
        lease.attempt = job.attempts
        kind = self.kinds.get(job.kind)
        await publish_change(self.publish, job, "JOB_STARTED")
        if kind is None:
            run = _Run(self, job, (), lease)
            await self._finish(run, _failure("unknown_kind", job.kind))
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
        """Run the kind's code with the lease kept alive; record how it ended.

        The lease keeper runs until the end is recorded, which may wait for
        Redis, so that no other worker takes over a job that has done its work.
        """
        loop = asyncio.get_running_loop()
        work = loop.create_task(kind.run(run.job.params, run))
        helpers = [
            loop.create_task(self._keep(run, work)),
            loop.create_task(self._watch_cancel(run)),
        ]
        try:
            changes = await self._outcome(kind, run, work)
            if changes is None:
                return False
            await self._finish(run, changes)
            return True
        except _Abandon:
            return False
        finally:
            for helper in helpers:
                helper.cancel()

    async def _outcome(
        self, kind: JobKind, run: _Run, work: asyncio.Task[Any]
    ) -> dict[str, Any] | None:
        """The record changes that end the run; None if it was taken away."""
        try:
            result = await work
        except JobCancelled:
            return {"state": JobState.CANCELLED}
        except JobFailed as exc:
            return _failure(exc.code, str(exc))
        except (_Abandon, LeaseLost):
            logger.warning("job %s was taken from this worker; stopped", run.job.id)
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if run.lease.lost and task is not None and not task.cancelling():
                logger.warning("lease of job %s lost; stopped", run.job.id)
                return None
            raise
        except Exception:
            # A bug in the job kind: the client learns that the job failed.
            logger.exception("job %s of kind %s crashed", run.job.id, kind.name)
            return _failure("crashed", f"the {kind.name} job failed unexpectedly")
        return {"state": JobState.SUCCEEDED, "progress": 100, "result": result}

    async def _finish(self, run: _Run, changes: dict[str, Any]) -> None:
        """Record the job's end, waiting for Redis if it is away."""
        job_id = run.job.id
        final = {**changes, "finished_at": time.time()}
        update = await run.hold(
            lambda: self.store.update(job_id, final, when=_RUNNING, lease=run.lease)
        )
        if update is not None and not update.applied:
            # A try whose answer was lost in an outage may have been recorded:
            # its finishing time says so, and the end is published all the same.
            if update.job.finished_at == final["finished_at"]:
                update = Update(True, update.job)
        if update is None or not update.applied:
            raise _Abandon
        state = update.job.state
        self.metrics.finished.labels(update.job.kind, state.value).inc()
        logger.debug("job %s %s", job_id, state.value)
        await publish_change(self.publish, update.job, EVENT_TYPES[state])
        # After the last event, so that the topic's keys exist to be expired.
        # Waiting for Redis if need be: a topic left without an end stays for ever.
        expire = self.expire_topic
        if expire is not None:
            topic, ttl = update.job.topic, self.store.ttl
            await run.hold(lambda: expire(topic, ttl))

    async def _keep(self, run: _Run, work: asyncio.Task[Any]) -> None:
        """Renew the lease every third of its life; stop the work if it is lost.

        While Redis is away it tries again every ``RETRY_PAUSE`` seconds: the
        lease may expire meanwhile, and goes back to this run on the first
        renewal once Redis answers, unless another worker has started the job.
        """
        lease = run.lease
        pause = self.lease_ttl / 3
        while True:
            await asyncio.sleep(pause)
            try:
                held = await self.store.renew(lease, self.lease_ttl)
            except Unavailable as exc:
                run.store_unreachable(exc)
                pause = min(RETRY_PAUSE, self.lease_ttl / 3)
                continue
            run.store_reachable()
            pause = self.lease_ttl / 3
            if not held:
                lease.lost = True
                work.cancel()
                return

    async def _watch_cancel(self, run: _Run) -> None:
        """Look for a cancel request every ``CANCEL_POLL`` s; wake the run on one."""
        while True:
            await asyncio.sleep(CANCEL_POLL)
            try:
                requested = await self.store.cancel_requested(run.job.id)
            except Unavailable as exc:
                run.store_unreachable(exc)
                continue
            if requested:
                run.cancelled.set()
                return


def _failure(code: str, message: str) -> dict[str, Any]:
    if code == "unknown_kind":
        message = f"no job kind {message!r} in this worker"
    return {"state": JobState.FAILED, "error": {"code": code, "message": message}}
