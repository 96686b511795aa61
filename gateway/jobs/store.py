"""Where job records and the job queue live: the contract, and the in-memory store.

A store keeps one record per job and a queue of job ids waiting for a worker. Every
change goes through ``update``, which bumps the record's version and may be made
conditional on the job's state and on holding its lease. The lease is what keeps a
job from running twice at once: a worker takes it before running a job, renews it
while the job runs, and a record change from a worker that lost it to another is
refused. A lease that only expired (the store was away) goes back to its holder
while no other run has started.

The in-memory store serves one process, whose own worker pool runs every job; the
Redis store (``gateway.jobs.redis_store``) serves replicas and ``gateway worker``
processes sharing one Redis.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError
from gateway.jobs.model import FINISHED, Job, JobState

__all__ = [
    "Delivery",
    "Lease",
    "LeaseLost",
    "MemoryJobStore",
    "JobStore",
    "Update",
]

logger = logging.getLogger(__name__)


class LeaseLost(GatewayError):
    """A worker changed a job whose lease it no longer holds; nothing was written."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One job handed to a worker by the queue.

    Attributes:
        entry: the queue's id for this delivery, needed to acknowledge it.
        job_id: the job to run.
        claimed: taken over from a worker that stopped answering.
    """

    entry: str
    job_id: str
    claimed: bool = False


@dataclass(slots=True)
class Lease:
    """The right to run one job, held by one worker until it expires."""

    job_id: str
    entry: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Set when a renewal found the lease gone: the job must stop at once.
    lost: bool = False
    #: Seconds the lease lasts from its last renewal.
    ttl: float = 0.0
    #: The ``attempts`` this run wrote when it started, None before. A lease that
    #: expired while Redis was away may be taken again by its holder as long as
    #: the record still shows this attempt running: no other run has started.
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class Update:
    """What ``update`` did: ``applied`` is false when the state did not allow it."""

    applied: bool
    job: Job


class JobStore(abc.ABC):
    """Job records, the queue of jobs to run and their leases.

    Methods may be called from many tasks at once. Those that reach Redis raise
    ``gateway.errors.Unavailable`` while it cannot be reached.
    """

    def __init__(self, *, ttl: float) -> None:
        """Create a store.

        Args:
            ttl: seconds a finished job's record is kept after it finished. An
                unfinished job's record is kept while it is queued or running
                (the Redis store bounds that, see ``UNFINISHED_TTL`` there).
        """
        self.ttl = ttl

    async def start(self) -> None:
        """Connect to whatever the store needs."""
        return None

    async def close(self) -> None:
        """Release connections and background tasks."""
        return None

    async def reserve(self, job_id: str) -> None:
        """Book ``job_id`` for the ``create`` that follows within a few seconds.

        ``create`` writes nothing once the booking has lapsed. So a ``create``
        that a stalled Redis runs only after its caller gave up (and answered
        503) cannot record a job that nobody was told about.
        """
        return None

    @abc.abstractmethod
    async def create(self, job: Job) -> None:
        """Store a new record (version 1) and queue it, in one step.

        Calling it again for the same job does nothing more.

        Raises:
            Unavailable: the store cannot be reached, or the booking made by
                ``reserve`` has lapsed; nothing was written.
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The job's record, or None if it never existed or has expired."""

    @abc.abstractmethod
    async def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        when: frozenset[JobState] | None = None,
        lease: Lease | None = None,
    ) -> Update | None:
        """Apply ``changes`` (``Job`` field names) and bump the version.

        Args:
            job_id: the job to change.
            changes: new values by field name; ``updated_at`` is set too.
            when: apply only if the job is in one of these states.
            lease: apply only while this lease is held.

        Returns:
            What was done, with the record as it now is; None for an unknown job.

        Raises:
            LeaseLost: ``lease`` is no longer held; nothing was written.
        """

    @abc.abstractmethod
    async def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for the job; True for a job that is gone.

        Running jobs call this about twice a second, so it must be cheap.
        """

    @abc.abstractmethod
    async def wait_change(self, job_id: str, version: int, seconds: float) -> None:
        """Return once the job's version differs from ``version``, or after ``seconds``.

        Also returns when the record disappears. Cancelling the wait is safe.
        """

    @abc.abstractmethod
    async def take(self, count: int, block: float) -> list[Delivery]:
        """Up to ``count`` queued jobs, waiting up to ``block`` seconds for one."""

    async def reclaim(self, count: int, idle: float) -> list[Delivery]:
        """Up to ``count`` jobs delivered to a worker that went silent ``idle`` s ago.

        Stores whose workers all live in one process have nothing to reclaim.
        """
        return []

    async def done(self, delivery: Delivery) -> None:
        """Acknowledge a delivery: the job is finished, or was not to be run."""
        return None

    async def acquire(self, delivery: Delivery, ttl: float) -> Lease | None:
        """Take the job's lease for ``ttl`` seconds; None while another holds it."""
        return Lease(delivery.job_id, delivery.entry, ttl=ttl)

    async def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend a held lease by ``ttl`` seconds; False if it was lost.

        A lease that merely expired is taken again when ``lease.attempt`` is
        still the run on record (see ``Lease.attempt``).
        """
        return True

    async def release(self, lease: Lease) -> None:
        """Give the lease up, if still held."""
        return None


def apply_changes(job: Job, changes: Mapping[str, Any], now: float) -> Job:
    """The job with ``changes`` applied, its version bumped and ``updated_at`` set."""
    return job.replace(**changes, updated_at=now, version=job.version + 1)


class MemoryJobStore(JobStore):
    """Records in a dictionary and the queue in an ``asyncio.Queue``.

    Every job runs in this process, delivered once, so leases always succeed.
    A sweep forgets finished jobs ``ttl`` seconds after they finished.
    """

    def __init__(self, *, ttl: float) -> None:
        super().__init__(ttl=ttl)
        self._jobs: dict[str, Job] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        # Per job with a waiting long poll: an event set (and dropped) on its
        # next change, so every waiter wakes once.
        self._changed: dict[str, asyncio.Event] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep(self) -> None:
        interval = min(self.ttl / 2, 60.0)
        while True:
            await asyncio.sleep(interval)
            limit = time.time() - self.ttl
            expired = [
                job.id
                for job in self._jobs.values()
                if job.state in FINISHED and (job.finished_at or 0) < limit
            ]
            for job_id in expired:
                del self._jobs[job_id]
                self._wake(job_id)
            if expired:
                logger.debug("forgot %d finished jobs", len(expired))

    def _wake(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    async def create(self, job: Job) -> None:
        if job.id not in self._jobs:
            self._jobs[job.id] = job
            self._queue.put_nowait(job.id)

    async def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def cancel_requested(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is None or job.cancel_requested

    async def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        when: frozenset[JobState] | None = None,
        lease: Lease | None = None,
    ) -> Update | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if when is not None and job.state not in when:
            return Update(False, job)
        job = self._jobs[job_id] = apply_changes(job, changes, time.time())
        self._wake(job_id)
        return Update(True, job)

    async def wait_change(self, job_id: str, version: int, seconds: float) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.version != version:
            return
        event = self._changed.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    async def take(self, count: int, block: float) -> list[Delivery]:
        try:
            first = await asyncio.wait_for(self._queue.get(), block)
        except TimeoutError:
            return []
        taken = [first]
        while len(taken) < count and not self._queue.empty():
            taken.append(self._queue.get_nowait())
        return [Delivery(job_id, job_id) for job_id in taken]
