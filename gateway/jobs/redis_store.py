"""Job records, queue and leases in Redis, shared by replicas and workers.

Keys, with the configured prefix ``P`` (``gateway:`` by default):

- ``Pjob:{<id>}``        a hash per job: its fields, JSON for the structured ones,
  and ``version``, bumped by every change. A finished job's hash expires ``ttl``
  seconds after it finished. An unfinished job's expires only
  ``UNFINISHED_TTL`` (or ``ttl``, if longer) after its last change or lease
  renewal: a queued job may wait, and a step may last, longer than ``ttl``, yet a
  record whose queue entry was lost (deleted by hand) still ends;
- ``Pjob:{<id>}:lease``  the job's lease: a worker's random token, expiring unless
  that worker renews it;
- ``Pjob:{<id>}:ticket`` a short-lived booking of a job id being submitted;
- ``Pjobs:queue``        a stream of job ids, read by the consumer group
  ``workers``; an entry is acknowledged and deleted once its job is done.

A job is recorded and queued by one script, so a record never exists without its
queue entry. The script runs only while the ticket made just before it lives
(``_TICKET_TTL``, shorter than a command's timeout): a submission whose answer
timed out because Redis stalled, and that Redis runs once it resumes, writes
nothing, so the 503 its client got stays true.

A worker reads entries with XREADGROUP. While it runs a job it renews the lease and
claims its own entry again (XCLAIM), which keeps the entry's idle time low; an
entry idle for longer than the claim delay belongs to a worker that stopped, and
another worker takes it over with XAUTOCLAIM. That worker runs the job only if it
can take the lease, and every record change checks the lease inside Redis, so a
worker that was paused and lost its lease cannot write over its successor. A lease
that expired while Redis was away, with no other run started since (the record's
``attempts`` is still the holder's), is taken again by its holder, so that its job
carries on where it was.

The job hash, its lease and its ticket share a hash tag; the create script also
touches the queue, so this store needs one Redis server, not a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from gateway.config import without_credentials
from gateway.errors import Unavailable
from gateway.jobs.model import Job, JobState
from gateway.jobs.store import Delivery, JobStore, Lease, LeaseLost, Update

__all__ = ["UNFINISHED_TTL", "RedisJobStore"]

logger = logging.getLogger(__name__)

_GROUP = "workers"
#: Seconds between two reads of a record's version during a long poll.
_WAIT_INTERVAL = 0.1
#: Seconds a command may wait for its answer before it counts as failed.
_SOCKET_TIMEOUT = 5.0
#: Seconds a submission's ticket lives. Shorter than ``_SOCKET_TIMEOUT``: a create
#: script whose caller timed out can only run later than this after the ticket
#: was made, so it finds the ticket gone and writes nothing.
_TICKET_TTL = 3.0
#: Seconds an unfinished job's record is kept after its last change or lease
#: renewal (at least the finished jobs' ``ttl``). A running job's worker renews it
#: every few seconds; a queued job waits this long at most.
UNFINISHED_TTL = 7 * 86400.0
_T = TypeVar("_T")

# KEYS: the job hash, its ticket, the queue. ARGV: the unfinished record's time to
# live in ms, the job id, then field and value pairs. Returns 1 once the job is recorded
# and queued (also when it already was: a repeated call), 0 when the ticket has
# lapsed and nothing was written.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('DEL', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[2])
return 1
"""

# Whether the lease's holder may take it again: the lease is gone (it expired)
# and the record still shows the holder's run (ARGV[n]: its attempt) running, so
# that no other worker has started the job since.
_RETAKE = """
local function may_retake(lease, job, attempt)
  return attempt ~= '' and redis.call('EXISTS', lease) == 0
    and redis.call('HGET', job, 'attempts') == attempt
    and redis.call('HGET', job, 'state') == 'running'
end
"""

# KEYS: the job hash, its lease. ARGV: allowed states (comma-separated, or empty
# for any), the lease token (empty: no check), the time now, the record's time to
# live in ms once finished, the run's attempt (empty: an expired lease is lost),
# the lease's time to live in ms, the record's time to live in ms while
# unfinished, then field and value pairs. Returns false for an unknown job, -1 for
# a lost lease, else {applied (0 or 1), the record's fields}.
_UPDATE = (
    _RETAKE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then
  if not may_retake(KEYS[2], KEYS[1], ARGV[5]) then return -1 end
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[6])
end
local state = redis.call('HGET', KEYS[1], 'state')
local allowed = ',' .. ARGV[1] .. ','
if ARGV[1] ~= '' and not string.find(allowed, ',' .. state .. ',', 1, true) then
  return {0, redis.call('HGETALL', KEYS[1])}
end
if #ARGV > 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 8)) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'version', 1)
state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {1, redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: a lease, its job hash. ARGV: the holder's token, the new time to live in
# ms, the run's attempt (empty: an expired lease is lost), the unfinished record's
# time to live in ms. Returns 1 when renewed, 2 when taken again after it expired,
# 0 when lost. A renewal also keeps the record of a running job, however long its
# step, from expiring; never that of a finished one.
_RENEW = (
    _RETAKE
    + """
local held = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  held = 1
elseif may_retake(KEYS[1], KEYS[2], ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  held = 2
end
if held > 0 and redis.call('HGET', KEYS[2], 'state') == 'running' then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return held
"""
)

# KEYS: a lease. ARGV: the holder's token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_JSON_FIELDS = ("params", "result", "error")
_FLOAT_FIELDS = ("created_at", "started_at", "updated_at", "finished_at")
_INT_FIELDS = ("progress", "step_index", "step_count", "version", "attempts")


def _encode_value(name: str, value: Any) -> str | bytes:
    if value is None:
        return ""
    if name in _JSON_FIELDS:
        return orjson.dumps(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, JobState):
        return value.value
    return str(value) if not isinstance(value, float) else repr(value)


def _encode(changes: Mapping[str, Any]) -> list[str | bytes]:
    flat: list[str | bytes] = []
    for name, value in changes.items():
        flat += [name, _encode_value(name, value)]
    return flat


def _decode(fields: Mapping[bytes, bytes]) -> Job:
    text = {key.decode(): value for key, value in fields.items()}
    values: dict[str, Any] = {}
    for name in _JSON_FIELDS:
        raw = text.get(name, b"")
        values[name] = orjson.loads(raw) if raw else None
    for name in _FLOAT_FIELDS:
        raw = text.get(name, b"")
        values[name] = float(raw) if raw else None
    for name in _INT_FIELDS:
        values[name] = int(text.get(name, b"0") or 0)
    for name in ("step", "worker"):
        values[name] = text.get(name, b"").decode() or None
    return Job(
        id=text["id"].decode(),
        kind=text["kind"].decode(),
        state=JobState(text["state"].decode()),
        cancel_requested=text.get("cancel_requested") == b"1",
        **{
            **values,
            "params": values["params"] or {},
            "created_at": values["created_at"] or 0.0,
            "updated_at": values["updated_at"] or 0.0,
        },
    )


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisJobStore(JobStore):
    """Job records, queue and leases in one Redis server."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        consumer: str,
        ttl: float,
        connections: int = 16,
    ) -> None:
        """Create a store; nothing connects before ``start``.

        Args:
            url: a ``redis://`` or ``rediss://`` URL.
            prefix: put before every key.
            consumer: this process's name in the consumer group.
            ttl: seconds a finished job's record is kept after it finished.
            connections: most connections to Redis at once; a blocking read of
                the queue holds one.
        """
        super().__init__(ttl=ttl)
        self._url = url
        self._prefix = prefix
        self._consumer = consumer
        self._connections = connections
        self._queue = f"{prefix}jobs:queue"
        self._redis: aioredis.Redis | None = None
        self._create_script: Any = None
        self._update_script: Any = None
        self._renew_script: Any = None
        self._release_script: Any = None
        # Seconds an unfinished job's record lives after its last change or
        # lease renewal.
        self._unfinished_ttl = max(ttl, UNFINISHED_TTL)
        # Where the next XAUTOCLAIM scan starts; it wraps around to 0-0.
        self._claim_cursor = "0-0"

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}job:{{{job_id}}}"

    def _lease_key(self, job_id: str) -> str:
        return f"{self._key(job_id)}:lease"

    def _ticket_key(self, job_id: str) -> str:
        return f"{self._key(job_id)}:ticket"

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise Unavailable("job store not started")
        return self._redis

    async def _call(self, work: Awaitable[_T]) -> _T:
        try:
            return await work
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis unavailable for jobs: {exc}") from exc

    async def start(self) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=self._connections,
            timeout=5,
            socket_connect_timeout=2,
            socket_timeout=_SOCKET_TIMEOUT,
            health_check_interval=5,
            # No silent retries: a command sent again after a timeout could run
            # twice; callers decide.
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._create_script = self._redis.register_script(_CREATE)
        self._update_script = self._redis.register_script(_UPDATE)
        self._renew_script = self._redis.register_script(_RENEW)
        self._release_script = self._redis.register_script(_RELEASE)
        try:
            await self._redis.xgroup_create(self._queue, _GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            # Another replica or worker made the group first.
            if "BUSYGROUP" not in str(exc):
                raise Unavailable(f"cannot make the job queue: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"redis at {without_credentials(self._url)} unreachable: {exc}"
            ) from exc

    async def close(self) -> None:
        if self._redis is not None:
            # The pool was made here, so the client does not close it by itself.
            await self._redis.aclose(close_connection_pool=True)

    async def reserve(self, job_id: str) -> None:
        ticket = self._ticket_key(job_id)
        await self._call(self._client().set(ticket, "1", px=_ms(_TICKET_TTL)))

    async def create(self, job: Job) -> None:
        fields = _encode(
            {name: getattr(job, name) for name in Job.__dataclass_fields__}
        )
        keys = [self._key(job.id), self._ticket_key(job.id), self._queue]
        args = [_ms(self._unfinished_ttl), job.id, *fields]
        created = await self._call(self._create_script(keys=keys, args=args))
        if not created:
            raise Unavailable(
                f"redis stalled while job {job.id} was submitted; it was not recorded"
            )

    async def get(self, job_id: str) -> Job | None:
        fields: Any = await self._call(self._client().hgetall(self._key(job_id)))
        return _decode(fields) if fields else None

    async def cancel_requested(self, job_id: str) -> bool:
        key = self._key(job_id)
        value = await self._call(self._client().hget(key, "cancel_requested"))
        # No field means no record: the job expired under its worker.
        return value is None or value == b"1"

    async def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        when: frozenset[JobState] | None = None,
        lease: Lease | None = None,
    ) -> Update | None:
        attempt = lease.attempt if lease is not None else None
        args: list[Any] = [
            ",".join(sorted(state.value for state in when)) if when else "",
            lease.token if lease is not None else "",
            repr(time.time()),
            int(self.ttl * 1000),
            "" if attempt is None else str(attempt),
            _ms(lease.ttl) if lease is not None else 0,
            _ms(self._unfinished_ttl),
            *_encode(changes),
        ]
        keys = [self._key(job_id), self._lease_key(job_id)]
        answer = await self._call(self._update_script(keys=keys, args=args))
        if answer is None:
            return None
        if answer == -1:
            raise LeaseLost(f"lease of job {job_id} lost")
        applied, flat = answer
        return Update(bool(applied), _decode(_pairs(flat)))

    async def wait_change(self, job_id: str, version: int, seconds: float) -> None:
        # Reading one field every tenth of a second is cheap for Redis and keeps
        # the wait independent of pub/sub, which may drop messages.
        deadline = time.monotonic() + seconds
        key = self._key(job_id)
        while True:
            current = await self._call(self._client().hget(key, "version"))
            if current is None or int(current) != version:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(_WAIT_INTERVAL, left))

    async def take(self, count: int, block: float) -> list[Delivery]:
        answer: Any = await self._call(
            self._client().xreadgroup(
                _GROUP,
                self._consumer,
                {self._queue: ">"},
                count=count,
                block=max(1, int(block * 1000)),
            )
        )
        deliveries = []
        for _, entries in answer or []:
            for entry, fields in entries:
                deliveries.append(Delivery(entry.decode(), fields[b"job"].decode()))
        return deliveries

    async def reclaim(self, count: int, idle: float) -> list[Delivery]:
        answer = await self._call(
            self._client().xautoclaim(
                self._queue,
                _GROUP,
                self._consumer,
                min_idle_time=int(idle * 1000),
                start_id=self._claim_cursor,
                count=count,
            )
        )
        cursor, entries = answer[0], answer[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        deliveries = []
        for entry, fields in entries:
            if not fields:
                # The entry was deleted from the stream: nothing left to run.
                await self._ack(entry.decode())
                continue
            deliveries.append(
                Delivery(entry.decode(), fields[b"job"].decode(), claimed=True)
            )
        return deliveries

    async def done(self, delivery: Delivery) -> None:
        await self._ack(delivery.entry)

    async def _ack(self, entry: str) -> None:
        async with self._client().pipeline(transaction=False) as pipe:
            pipe.xack(self._queue, _GROUP, entry)
            pipe.xdel(self._queue, entry)
            await self._call(pipe.execute())

    async def acquire(self, delivery: Delivery, ttl: float) -> Lease | None:
        lease = Lease(delivery.job_id, delivery.entry, ttl=ttl)
        taken = await self._call(
            self._client().set(
                self._lease_key(delivery.job_id), lease.token, nx=True, px=_ms(ttl)
            )
        )
        return lease if taken else None

    async def renew(self, lease: Lease, ttl: float) -> bool:
        client = self._client()
        keys = [self._lease_key(lease.job_id), self._key(lease.job_id)]
        attempt = "" if lease.attempt is None else str(lease.attempt)
        held = await self._call(
            self._renew_script(
                keys=keys,
                args=[lease.token, _ms(ttl), attempt, _ms(self._unfinished_ttl)],
            )
        )
        if held == 2:
            logger.debug(
                "lease of job %s had expired while redis was away; taken again",
                lease.job_id,
            )
        if held:
            # Claiming its own entry again resets its idle time, so that other
            # workers do not take over a job whose worker is alive.
            await self._call(
                client.xclaim(
                    self._queue,
                    _GROUP,
                    self._consumer,
                    min_idle_time=0,
                    message_ids=[lease.entry],
                    justid=True,
                )
            )
        return bool(held)

    async def release(self, lease: Lease) -> None:
        await self._call(
            self._release_script(
                keys=[self._lease_key(lease.job_id)], args=[lease.token]
            )
        )


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
