"""Jobs: POST, polling with ETags, long polls, cancel, workers and their failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry
from services import RedisServer
from support import (
    API_KEY,
    Gateway,
    admin_stats,
    assert_no_error_logged,
    read_metrics,
    running_gateway,
    timeout,
    wait_until,
    ws_client,
)

from gateway.config import SettingsError, load_settings
from gateway.errors import BadRequest, Unavailable
from gateway.events.envelope import Draft, Event
from gateway.jobs.builtin import DbRefresh, Report
from gateway.jobs.kinds import load_kinds
from gateway.jobs.metrics import JobMetrics
from gateway.jobs.model import Job, JobState
from gateway.jobs.redis_store import UNFINISHED_TTL, RedisJobStore
from gateway.jobs.runner import WorkerPool
from gateway.jobs.store import Lease, LeaseLost, MemoryJobStore, Update
from gateway.state.memory import MemoryBackend

AUTH = {"Authorization": f"Bearer {API_KEY}"}


# Helpers.


async def submit(
    http: httpx.AsyncClient, gateway: Gateway, kind: str = "db-refresh", **params: Any
) -> dict[str, Any]:
    """POST a job; fails unless 202; returns the body."""
    response = await http.post(
        f"{gateway.http_url}/jobs", json={"kind": kind, "params": params}, headers=AUTH
    )
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/jobs/{response.json()['id']}"
    body: dict[str, Any] = response.json()
    return body


async def get_job(
    http: httpx.AsyncClient,
    gateway: Gateway,
    job_id: str,
    *,
    etag: str | None = None,
    wait: float | None = None,
) -> httpx.Response:
    headers = {"If-None-Match": etag} if etag else {}
    params = {"wait": str(wait)} if wait is not None else {}
    return await http.get(
        f"{gateway.http_url}/jobs/{job_id}", headers=headers, params=params
    )


async def follow(
    http: httpx.AsyncClient,
    gateway: Gateway,
    job_id: str,
    until: Callable[[dict[str, Any]], bool],
    seconds: float = 10.0,
) -> list[dict[str, Any]]:
    """Long-poll a job, one state per change, until ``until`` holds for one."""
    seen: list[dict[str, Any]] = []
    etag = None
    deadline = time.monotonic() + timeout(seconds)
    while time.monotonic() < deadline:
        response = await get_job(http, gateway, job_id, etag=etag, wait=5)
        if response.status_code == 304:
            continue
        assert response.status_code == 200, response.text
        etag = response.headers["etag"]
        seen.append(response.json())
        if until(seen[-1]):
            return seen
    raise AssertionError(f"job {job_id} never got there; last: {seen[-1:]}")


def finished(job: dict[str, Any]) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@contextlib.contextmanager
def running_worker(tmp_path: Path, name: str, **settings: Any) -> Iterator[Worker]:
    worker = Worker.start(tmp_path, name, **settings)
    try:
        yield worker
    finally:
        worker.stop()


class Worker:
    """A ``gateway worker`` process started by a test, on the test's Redis."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    def start(cls, tmp_path: Path, name: str, **settings: Any) -> Worker:
        env = dict(os.environ)
        env.update({"GATEWAY_REPLICA": name, "GATEWAY_API_KEY": API_KEY})
        env["GATEWAY_MQTT_BROKER"] = "none"
        for key, value in settings.items():
            env[f"GATEWAY_{key.upper()}"] = str(value)
        log_path = tmp_path / f"worker-{name}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "worker"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        worker = cls(process, log_path)
        deadline = time.monotonic() + timeout(15)
        while "worker pool" not in worker.log():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"worker did not start:\n{worker.log()}")
            time.sleep(0.05)
        return worker

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout(15))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


# C12 and the job lifecycle.


async def test_c12_job_polling(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """C12: 202 and Location; ETag, private Cache-Control and Retry-After while
    running; 304 before a change; 200 with a new ETag once progress moves from 40
    to 55; different ETags for two jobs in one state; JSON 404; the result at the
    end with a new ETag and no Retry-After."""
    with running_gateway(tmp_path) as gateway:
        # 'drop' runs from 25 to 50 % in 5 ticks of 0.5 s, so 40 % holds for
        # half a second; 'restore' reaches 55 % 0.5 s after it starts.
        posted = await submit(
            http,
            gateway,
            durations={"snapshot": 0.2, "drop": 2.5, "restore": 2.5, "sanitize": 0.2},
        )
        job_id = posted["id"]
        assert posted["statusUrl"] == f"/jobs/{job_id}"
        assert posted["topic"] == f"jobs/{job_id}"
        assert posted["pollInterval"] == 1
        assert len(job_id) >= 32  # 192 random bits, URL-safe base64

        states = await follow(http, gateway, job_id, lambda j: j["progress"] >= 40)
        assert states[-1]["progress"] == 40, states[-1]
        first = await get_job(http, gateway, job_id)
        assert first.status_code == 200
        assert first.json()["progress"] == 40
        etag = first.headers["etag"]
        assert first.headers["cache-control"] == "private, no-cache"
        assert first.headers["retry-after"] == "1"

        unchanged = await get_job(http, gateway, job_id, etag=etag)
        assert unchanged.status_code == 304
        assert unchanged.content == b""
        assert unchanged.headers["etag"] == etag
        assert unchanged.headers["retry-after"] == "1"
        assert unchanged.headers["cache-control"] == "private, no-cache"

        states = await follow(http, gateway, job_id, lambda j: j["progress"] >= 55)
        assert states[-1]["progress"] == 55
        moved = await get_job(http, gateway, job_id, etag=etag)
        assert moved.status_code == 200
        assert moved.json()["progress"] == 55
        assert moved.headers["etag"] != etag

        # Two report jobs end in the same state with the same result.
        twins = [(await submit(http, gateway, "report"))["id"] for _ in range(2)]
        ends = [await follow(http, gateway, i, finished) for i in twins]
        assert [e[-1]["result"] for e in ends][0] == ends[1][-1]["result"]
        tags = [(await get_job(http, gateway, i)).headers["etag"] for i in twins]
        assert tags[0] != tags[1]

        unknown = await get_job(http, gateway, "A" * 32)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "not_found"
        assert unknown.headers["content-type"] == "application/json"

        last = (await follow(http, gateway, job_id, finished))[-1]
        assert last["state"] == "succeeded"
        assert last["result"]["database"] == "qa"
        done = await get_job(http, gateway, job_id, etag=moved.headers["etag"])
        assert done.status_code == 200
        assert done.json()["result"] == last["result"]
        assert done.headers["etag"] not in (etag, moved.headers["etag"])
        assert "retry-after" not in done.headers
        assert done.headers["cache-control"] == "private, no-cache"
        assert_no_error_logged(gateway)


async def test_states_go_forward_and_metrics_count(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """A job behind another in a one-worker pool is seen queued, running, then
    succeeded, its progress never lower than before; metrics count it."""
    with running_gateway(tmp_path, job_workers=1) as gateway:
        ahead = await submit(http, gateway, step_seconds=0.2, ticks=1)
        posted = await submit(http, gateway, step_seconds=0.2, ticks=4)
        assert posted["job"]["state"] == "queued"
        seen = await follow(http, gateway, posted["id"], finished)
        states = [s["state"] for s in seen]
        assert [s for i, s in enumerate(states) if s not in states[:i]] == [
            "queued",
            "running",
            "succeeded",
        ], states
        progress = [s["progress"] for s in seen]
        assert progress == sorted(progress), progress
        assert progress[-1] == 100
        assert len(set(progress)) >= 5, progress
        await follow(http, gateway, ahead["id"], finished)

        samples = await read_metrics(http, gateway)
        assert samples['gateway_jobs_submitted_total{kind="db-refresh"}'] == 2
        key = 'gateway_jobs_finished_total{kind="db-refresh",state="succeeded"}'
        assert samples[key] == 2
        assert samples["gateway_jobs_running"] == 0
        assert_no_error_logged(gateway)


async def test_long_poll_waits_and_returns_early_on_cancel(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """With no worker a job stays queued: a long poll on its ETag answers 304 after
    its wait, and returns at once with the new state when the job is cancelled."""
    with running_gateway(tmp_path, job_workers=0) as gateway:
        posted = await submit(http, gateway)
        job_id = posted["id"]
        current = await get_job(http, gateway, job_id)
        etag = current.headers["etag"]

        started = time.monotonic()
        waited = await get_job(http, gateway, job_id, etag=etag, wait=0.6)
        assert waited.status_code == 304
        assert time.monotonic() - started >= 0.55

        # Without the current ETag the client is behind: answered at once.
        started = time.monotonic()
        stale = await get_job(http, gateway, job_id, etag='"old"', wait=5)
        assert stale.status_code == 200
        assert time.monotonic() - started < timeout(1)

        async def cancel_soon() -> httpx.Response:
            await asyncio.sleep(0.5)
            return await http.delete(f"{gateway.http_url}/jobs/{job_id}", headers=AUTH)

        started = time.monotonic()
        long_poll, cancel = await asyncio.gather(
            get_job(http, gateway, job_id, etag=etag, wait=20), cancel_soon()
        )
        elapsed = time.monotonic() - started
        assert cancel.status_code == 200, cancel.text
        assert cancel.json()["state"] == "cancelled"
        assert long_poll.status_code == 200
        assert long_poll.json()["state"] == "cancelled"
        assert long_poll.headers["etag"] != etag
        assert "retry-after" not in long_poll.headers
        assert elapsed < timeout(2), elapsed

        # A finished job is answered at once, whatever the wait.
        started = time.monotonic()
        again = await get_job(
            http, gateway, job_id, etag=long_poll.headers["etag"], wait=20
        )
        assert again.status_code == 304
        assert time.monotonic() - started < timeout(1)


async def test_cancel_stops_a_running_job_at_its_next_step(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """DELETE on a running job answers 202; the job ends cancelled at the end of
    the step it was in, and its last event is JOB_CANCELLED."""
    with running_gateway(tmp_path) as gateway:
        posted = await submit(http, gateway, step_seconds=1.0, ticks=2)
        job_id = posted["id"]
        await follow(http, gateway, job_id, lambda j: j["state"] == "running")
        url = f"{gateway.http_url}/jobs/{job_id}"
        assert (await http.delete(url)).status_code == 401
        response = await http.delete(url, headers=AUTH)
        assert response.status_code == 202, response.text
        assert response.json()["cancelRequested"] is True
        assert response.headers["retry-after"] == "1"

        last = (await follow(http, gateway, job_id, finished))[-1]
        assert last["state"] == "cancelled"
        assert last["step"]["name"] == "snapshot"
        assert last["progress"] < 25
        assert last["result"] is None
        assert (await http.delete(url, headers=AUTH)).status_code == 200

        events = await http.get(f"{gateway.http_url}/topics/jobs/{job_id}/events")
        types = [e["eventType"] for e in events.json()["events"]]
        assert types[0] == "JOB_QUEUED"
        assert "JOB_CANCEL_REQUESTED" in types
        assert types[-1] == "JOB_CANCELLED"

        # A finished job cannot be cancelled.
        report = await submit(http, gateway, "report")
        await follow(http, gateway, report["id"], finished)
        refused = await http.delete(
            f"{gateway.http_url}/jobs/{report['id']}", headers=AUTH
        )
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "already_finished"


async def test_cancel_ends_a_long_step_within_a_second(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """A job cancelled 1 s into a 450 s step ends cancelled within about a second,
    in that step: in the gateway's own workers in memory, in a separate worker
    process with Redis."""
    settings = {"job_workers": 0} if backend == "redis" else {}
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(running_gateway(tmp_path, **settings))
        if backend == "redis":
            stack.enter_context(running_worker(tmp_path, "worker-cancel"))
        posted = await submit(http, gateway, durations={"snapshot": 450}, ticks=1)
        job_id = posted["id"]
        await follow(http, gateway, job_id, lambda j: j["step"] is not None)
        url = f"{gateway.http_url}/jobs/{job_id}"
        asked = time.monotonic()
        response = await http.delete(url, headers=AUTH)
        assert response.status_code == 202, response.text
        last = (await follow(http, gateway, job_id, finished, 5))[-1]
        elapsed = time.monotonic() - asked
        assert last["state"] == "cancelled", last
        assert last["step"]["name"] == "snapshot"
        assert elapsed < timeout(2), elapsed
        assert_no_error_logged(gateway)


async def test_failures_and_bad_requests(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """Bad kinds, parameters, bodies, keys and waits get JSON 400s and 401s; a job
    told to fail ends failed with its error."""
    with running_gateway(tmp_path) as gateway:
        url = f"{gateway.http_url}/jobs"
        cases = [
            ({"kind": "nope"}, "unknown_kind"),
            ({"kind": "db-refresh", "params": {"step_seconds": -1}}, "bad_params"),
            ({"kind": "db-refresh", "params": {"step_seconds": 601}}, "bad_params"),
            ({"kind": "db-refresh", "params": {"ticks": 0}}, "bad_params"),
            ({"kind": "db-refresh", "params": {"colour": "red"}}, "bad_params"),
            ({"kind": "db-refresh", "params": {"durations": {"x": 1}}}, "bad_params"),
            ({"kind": "report", "params": {"dataset": "/etc/passwd"}}, "bad_params"),
            ({"kind": "report", "params": []}, "bad_request"),
            ({"params": {}}, "bad_request"),
            ([], "bad_request"),
        ]
        for body, code in cases:
            response = await http.post(url, json=body, headers=AUTH)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["code"] == code, (body, response.text)
        bad_json = await http.post(url, content=b"{", headers=AUTH)
        assert bad_json.json()["error"]["code"] == "bad_json"
        no_key = await http.post(url, json={"kind": "report"})
        assert no_key.status_code == 401
        assert no_key.json()["error"]["code"] == "unauthorized"

        posted = await submit(http, gateway, step_seconds=0, fail_at="restore")
        for wait in ("31", "-1", "soon"):
            response = await http.get(f"{url}/{posted['id']}", params={"wait": wait})
            assert response.status_code == 400, wait
            assert response.json()["error"]["code"] == "bad_request"
        last = (await follow(http, gateway, posted["id"], finished))[-1]
        assert last["state"] == "failed"
        assert last["error"]["code"] == "step_failed"
        assert last["step"]["name"] == "restore"
        assert (await http.delete(f"{url}/{'B' * 32}", headers=AUTH)).status_code == 404
        assert_no_error_logged(gateway)


async def test_finished_jobs_expire(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """With --job-ttl 1 a finished job's record is gone (404) soon after."""
    with running_gateway(tmp_path, job_ttl=1) as gateway:
        posted = await submit(http, gateway, "report")
        await follow(http, gateway, posted["id"], finished)

        async def gone() -> bool:
            return (await get_job(http, gateway, posted["id"])).status_code == 404

        await wait_until(gone, 5, "finished job expired")


async def test_websocket_subscriber_gets_job_events(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """A WebSocket subscriber of jobs/<id> gets every change of the job, in order:
    from the gateway's own workers in memory, from a separate gateway worker
    process with Redis."""
    settings = {"job_workers": 0} if backend == "redis" else {}
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(running_gateway(tmp_path, **settings))
        if backend == "redis":
            stack.enter_context(running_worker(tmp_path, "worker-ws"))
        posted = await submit(http, gateway, step_seconds=0.1, ticks=2)
        async with ws_client(gateway) as client:
            # From offset 0, so that nothing published before is missed.
            await client.subscribe(posted["topic"], offsets={posted["topic"]: 0})
            events = []
            while not events or events[-1]["eventType"] != "JOB_SUCCEEDED":
                events += await client.events(1)
        types = [e["eventType"] for e in events]
        assert types[:2] == ["JOB_QUEUED", "JOB_STARTED"]
        assert types[-1] == "JOB_SUCCEEDED"
        assert set(types[2:-1]) == {"JOB_PROGRESSED"}
        assert [e["offset"] for e in events] == list(range(1, len(events) + 1))
        details = [e["eventDetails"] for e in events]
        progress = [d["progress"] for d in details]
        assert progress == sorted(progress)
        assert {d["id"] for d in details} == {posted["id"]}
        assert all(e["eventSource"] == "jobs" for e in events)
        if backend == "redis":
            assert details[-1]["attempts"] == 1


# Workers on Redis.


async def test_killed_worker_job_is_finished_by_another(
    tmp_path: Path, shared_redis: str, http: httpx.AsyncClient
) -> None:
    """A gateway worker killed with SIGKILL mid-job: a second worker takes the job
    over once the first one's lease has expired, and finishes it."""
    with running_gateway(tmp_path, job_workers=0) as gateway:
        first = Worker.start(tmp_path, "worker-a", job_workers=1, job_claim_after=1)
        try:
            posted = await submit(http, gateway, step_seconds=0.5, ticks=5)
            job_id = posted["id"]
            seen = await follow(http, gateway, job_id, lambda j: j["progress"] >= 10)
            assert seen[-1]["state"] == "running"
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(timeout(5))
            killed_at = time.time()
        finally:
            with contextlib.suppress(ProcessLookupError):
                first.process.kill()
        with running_worker(tmp_path, "worker-b", job_claim_after=1) as second:
            last = (await follow(http, gateway, job_id, finished, 15))[-1]
            assert "took over job" in second.log()
        assert last["state"] == "succeeded"
        assert last["attempts"] == 2
        assert iso(last["startedAt"]) > killed_at
        events = (
            await http.get(f"{gateway.http_url}/topics/jobs/{job_id}/events")
        ).json()["events"]
        starts = [e["eventDetails"] for e in events if e["eventType"] == "JOB_STARTED"]
        assert [s["attempts"] for s in starts] == [1, 2]
        assert [e["eventType"] for e in events].count("JOB_SUCCEEDED") == 1
        # Nothing from the first worker after the second one started.
        second_start = next(
            i for i, e in enumerate(events) if e["eventDetails"]["attempts"] == 2
        )
        assert all(e["eventDetails"]["attempts"] == 2 for e in events[second_start:])


async def test_paused_worker_keeps_its_lease_then_loses_its_job(
    tmp_path: Path, shared_redis: str, http: httpx.AsyncClient
) -> None:
    """While a worker renews its lease, an idle second worker never takes its job,
    even past the claim delay; once it is paused (SIGSTOP) the second takes over,
    and when it resumes its writes are refused: the job ends once, by the second."""
    with (
        running_gateway(tmp_path, job_workers=0) as gateway,
        running_worker(tmp_path, "worker-a", job_claim_after=1) as first,
    ):
        posted = await submit(http, gateway, step_seconds=1.0, ticks=4)
        job_id = posted["id"]
        await follow(http, gateway, job_id, lambda j: j["state"] == "running")
        with running_worker(tmp_path, "worker-b", job_claim_after=1) as second:
            # Not a synchronisation: nothing may happen during two claim delays.
            await asyncio.sleep(2.2)
            assert (await get_job(http, gateway, job_id)).json()["attempts"] == 1
            first.process.send_signal(signal.SIGSTOP)
            try:
                await follow(http, gateway, job_id, lambda j: j["attempts"] == 2)
            finally:
                first.process.send_signal(signal.SIGCONT)
            last = (await follow(http, gateway, job_id, finished, 15))[-1]

            async def first_gave_up() -> bool:
                return "was taken from this worker" in first.log() or (
                    "lease of job" in first.log()
                )

            await wait_until(first_gave_up, 5, "the paused worker dropped the job")
            assert "took over job" in second.log()
        assert last["state"] == "succeeded"
        assert last["attempts"] == 2
        events = (
            await http.get(f"{gateway.http_url}/topics/jobs/{job_id}/events")
        ).json()["events"]
        attempts = [e["eventDetails"]["attempts"] for e in events]
        # Once the second run started, nothing from the first one got through.
        assert attempts == sorted(attempts), attempts
        assert [e["eventType"] for e in events].count("JOB_SUCCEEDED") == 1


# Redis outages, on a Redis of the test's own.


def freeze(server: RedisServer) -> None:
    """Stop the test's Redis with SIGSTOP: it keeps its sockets and answers nothing."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    """Let a frozen Redis run again; it then runs what was sent meanwhile."""
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)


#: Seconds a freeze lasts: past the job store's 5 s command timeout, so that the
#: outage is seen, and past the 2 s claim delay of these tests, so that a job
#: would be taken over if its worker gave it up.
FREEZE_SECONDS = 7.0


@pytest.mark.timeout(120)
async def test_a_redis_freeze_holds_a_running_job_which_then_carries_on(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Two freezes of Redis under a running job: each is one WARNING line without
    traceback and no ERROR; the job waits where it is and carries on at its step
    under its first attempt, its progress never going back, and succeeds."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        with running_gateway(
            tmp_path, redis_url=server.url, job_claim_after=2
        ) as gateway:
            posted = await submit(http, gateway, step_seconds=3, ticks=6)
            job_id = posted["id"]
            progress = 0
            for _ in range(2):
                moved = await follow(
                    http, gateway, job_id, lambda j, p=progress: j["progress"] > p
                )
                progress = moved[-1]["progress"]
                freeze(server)
                try:
                    # Not a synchronisation: the outage lasts this long.
                    await asyncio.sleep(FREEZE_SECONDS)
                finally:
                    thaw(server)
            last = (await follow(http, gateway, job_id, finished, 30))[-1]
            events = (
                await http.get(f"{gateway.http_url}/topics/jobs/{job_id}/events")
            ).json()["events"]
        log = gateway.log()
    finally:
        server.stop()
    assert last["state"] == "succeeded", last
    assert last["attempts"] == 1
    types = [e["eventType"] for e in events]
    assert types.count("JOB_STARTED") == 1, types
    assert types[0] == "JOB_QUEUED"
    assert {e["eventDetails"]["attempts"] for e in events[1:]} == {1}
    steps = [e["eventDetails"]["progress"] for e in events]
    assert steps == sorted(steps), steps
    assert_no_error_logged(gateway)
    assert log.count(f"WARNING gateway.jobs.runner: job {job_id} waits") == 2, log
    assert log.count(f"job {job_id} carries on at step") == 2, log
    assert "took over job" not in log


@pytest.mark.timeout(60)
async def test_a_submission_refused_during_a_redis_freeze_leaves_nothing(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """POST /jobs while Redis is frozen answers 503; once Redis resumes and runs
    what was sent meanwhile, no job record and no queue entry is left."""
    prefix = "freeze:"
    server = RedisServer(tmp_path)
    server.start()
    try:
        with running_gateway(
            tmp_path, redis_url=server.url, redis_prefix=prefix, job_workers=0
        ) as gateway:
            # A read just before the freeze leaves the job store's connection
            # fresh, so the POST's first command is written to the socket at
            # once, without a health check, and Redis runs it when it resumes.
            assert (await get_job(http, gateway, "C" * 32)).status_code == 404
            freeze(server)
            try:
                refused = await http.post(
                    f"{gateway.http_url}/jobs",
                    json={"kind": "db-refresh", "params": {}},
                    headers=AUTH,
                )
            finally:
                thaw(server)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "unavailable"
            client = server.client()

            async def nothing_left() -> bool:
                return not list(client.scan_iter(match=f"{prefix}job:*"))

            # A ticket made by the refused POST may live up to 3 s.
            await wait_until(nothing_left, 6, "no job key left by the 503")
            assert client.xlen(f"{prefix}jobs:queue") == 0
            # Redis is back: submitting works again, record and entry together.
            accepted = await submit(http, gateway)
            assert client.xlen(f"{prefix}jobs:queue") == 1
            assert client.hget(f"{prefix}job:{{{accepted['id']}}}", "state") == (
                b"queued"
            )
    finally:
        server.stop()


@pytest.mark.timeout(60)
async def test_burst_of_1000_jobs(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """1,000 jobs posted at once: all answered 202, all succeed, each runs once,
    and no more than the worker's concurrency of 16 run at the same time."""
    concurrency = 16
    with contextlib.ExitStack() as stack:
        if backend == "redis":
            gateway = stack.enter_context(running_gateway(tmp_path, job_workers=0))
            stack.enter_context(
                running_worker(tmp_path, "worker-burst", job_workers=concurrency)
            )
        else:
            gateway = stack.enter_context(
                running_gateway(tmp_path, job_workers=concurrency)
            )
        # httpx spends CPU per waiting request: 50 in flight keep the burst
        # ahead of the workers without making the client the bottleneck.
        in_flight = asyncio.Semaphore(50)

        async def post() -> dict[str, Any]:
            async with in_flight:
                return await submit(http, gateway, step_seconds=0.01, ticks=1)

        posted = await asyncio.gather(*(post() for _ in range(1000)))
        ids = [p["id"] for p in posted]
        assert len(set(ids)) == 1000

        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout(40)
        while len(done) < len(ids):
            assert time.monotonic() < deadline, f"{len(done)} of 1000 finished"
            for job_id in ids:
                if job_id in done:
                    continue
                response = await get_job(http, gateway, job_id)
                assert response.status_code == 200, response.text
                if not finished(response.json()):
                    await asyncio.sleep(0.2)
                    break
                done[job_id] = response.json()
        jobs = list(done.values())
        assert {j["state"] for j in jobs} == {"succeeded"}
        assert {j["attempts"] for j in jobs} == {1}
        # The most runs at once, from the start and end times the worker wrote.
        edges = sorted(
            [(iso(j["startedAt"]), 1) for j in jobs]
            + [(iso(j["finishedAt"]), -1) for j in jobs]
        )
        running = most = 0
        for _, change in edges:
            running += change
            most = max(most, running)
        assert 1 < most <= concurrency, most
        assert_no_error_logged(gateway)


# Pure logic.


def test_etags_differ_for_two_jobs_in_one_state() -> None:
    """Two records equal in everything but the id have different ETags; the same
    record always has the same one."""
    one = Job(id="a" * 32, kind="report", params={}, created_at=1.0, updated_at=1.0)
    other = one.replace(id="b" * 32)
    assert one.body_and_etag()[1] != other.body_and_etag()[1]
    assert one.body_and_etag() == one.replace().body_and_etag()
    assert one.replace(progress=5).body_and_etag()[1] != one.body_and_etag()[1]
    assert one.replace(state=JobState.SUCCEEDED).finished


def test_db_refresh_parameters_are_bounded() -> None:
    """db-refresh fills defaults and refuses durations beyond its bounds."""
    kind = DbRefresh()
    valid = kind.validate({"durations": {"drop": 2}})
    assert valid["durations"] == {
        "snapshot": 0.5,
        "drop": 2.0,
        "restore": 0.5,
        "sanitize": 0.5,
    }
    assert valid["ticks"] == 5
    for bad in (
        {"step_seconds": True},
        {"step_seconds": "1"},
        {"durations": {"drop": 600, "restore": 600, "snapshot": 600, "sanitize": 600}},
        {"ticks": 101},
        {"database": "QA; drop"},
        {"fail_at": "nowhere"},
    ):
        with pytest.raises(BadRequest):
            kind.validate(bad)


def test_a_job_kind_that_cannot_be_loaded_is_a_usage_error() -> None:
    """--job-kinds naming a missing module, or something that is not a kind, stops
    the process at settings load: exit 2, the flag named, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--job-kinds", "nosuch:X"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GATEWAY_MQTT_BROKER": "none"},
    )
    assert result.returncode == 2, result.stderr
    assert "--job-kinds / GATEWAY_JOB_KINDS" in result.stderr, result.stderr
    assert "nosuch" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for bad in ("gateway.jobs.builtin:MAX_TICKS", "gateway.jobs.builtin:", "x"):
        with pytest.raises(SettingsError, match="--job-kinds / GATEWAY_JOB_KINDS"):
            load_settings(job_kinds=bad)
    good = "gateway.jobs.builtin:Report, gateway.jobs.builtin:DbRefresh"
    assert load_settings(job_kinds=good).job_kinds == good


async def _redis_store(prefix: str) -> RedisJobStore:
    store = RedisJobStore(
        os.environ["GATEWAY_REDIS_URL"], prefix=prefix, consumer="tests", ttl=60
    )
    await store.start()
    return store


def _new_job() -> Job:
    now = time.time()
    return Job(
        id=f"{os.urandom(12).hex()}abcdefgh",
        kind="report",
        params={},
        created_at=now,
        updated_at=now,
    )


async def test_a_create_runs_only_while_its_ticket_lives(shared_redis: str) -> None:
    """The create script writes record and queue entry together, only while the
    ticket of reserve lives (a lapsed one, here deleted, writes nothing), and a
    repeated create queues the job once."""
    store = await _redis_store(shared_redis)
    try:
        lapsed = _new_job()
        await store.reserve(lapsed.id)
        await store._client().delete(store._ticket_key(lapsed.id))
        with pytest.raises(Unavailable, match="not recorded"):
            await store.create(lapsed)
        assert await store.get(lapsed.id) is None

        job = _new_job()
        await store.reserve(job.id)
        await store.create(job)
        await store.create(job)
        recorded = await store.get(job.id)
        assert recorded is not None and recorded.state is JobState.QUEUED
        assert [d.job_id for d in await store.take(10, 0.1)] == [job.id]
    finally:
        await store.close()


async def test_an_expired_lease_goes_back_to_its_run_only(shared_redis: str) -> None:
    """A lease that expired goes back to its holder on renewal or on a write while
    the record still shows its run; once another worker started the job, the
    first holder's renewal and writes are refused."""
    store = await _redis_store(shared_redis)
    try:
        job = _new_job()
        await store.reserve(job.id)
        await store.create(job)
        delivery = (await store.take(1, 0.1))[0]
        lease = await store.acquire(delivery, 5)
        assert lease is not None
        started = {"state": JobState.RUNNING, "attempts": 1}
        await store.update(job.id, started, lease=lease)
        lease.attempt = 1
        lease_key = store._lease_key(job.id)

        await store._client().delete(lease_key)
        assert await store.renew(lease, 5)
        assert await store._client().get(lease_key) == lease.token.encode()
        await store._client().delete(lease_key)
        update = await store.update(job.id, {"progress": 10}, lease=lease)
        assert update is not None and update.applied

        await store._client().delete(lease_key)
        other = await store.acquire(delivery, 5)
        assert other is not None
        await store.update(job.id, {"attempts": 2}, lease=other)
        other.attempt = 2
        assert not await store.renew(lease, 5)
        with pytest.raises(LeaseLost):
            await store.update(job.id, {"progress": 20}, lease=lease)
        assert await store.renew(other, 5)
    finally:
        await store.close()


class _LosingStore(MemoryJobStore):
    """A memory store whose first final write is recorded, its answer then lost."""

    def __init__(self) -> None:
        super().__init__(ttl=60)
        self.lost = False

    async def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        when: frozenset[JobState] | None = None,
        lease: Lease | None = None,
    ) -> Update | None:
        update = await super().update(job_id, changes, when=when, lease=lease)
        if "finished_at" in changes and not self.lost:
            self.lost = True
            raise Unavailable("redis unavailable for jobs: the answer was lost")
        return update


async def test_a_final_write_whose_answer_was_lost_still_ends_the_job() -> None:
    """The write that ends a job is recorded but its answer lost: the worker tries
    again once the store answers, sees its own end recorded and publishes
    JOB_SUCCEEDED once."""
    store = _LosingStore()
    published: list[Draft] = []

    async def publish(drafts: Sequence[Draft]) -> list[Event]:
        published.extend(drafts)
        return []

    pool = WorkerPool(
        store=store,
        kinds=load_kinds(),
        publish=publish,
        metrics=JobMetrics(CollectorRegistry()),
        concurrency=1,
        name="tests",
        claim_after=2,
    )
    await store.start()
    pool.start()
    try:
        job = _new_job()
        await store.create(job.replace(params={"dataset": "debian"}, step_count=4))

        async def ended() -> bool:
            return any(d.type == "JOB_SUCCEEDED" for d in published)

        await wait_until(ended, 5, "JOB_SUCCEEDED published")
    finally:
        await pool.close(1)
        await store.close()
    assert store.lost
    recorded = await store.get(job.id)
    assert recorded is not None and recorded.state is JobState.SUCCEEDED
    assert [d.type for d in published].count("JOB_SUCCEEDED") == 1
    assert [d.type for d in published][-1] == "JOB_SUCCEEDED"


async def test_report_summarises_the_shipped_release_data() -> None:
    """The report reads the shipped Debian data and computes its statistics."""

    class Steps:
        names: list[str] = []

        async def step(self, name: str) -> None:
            self.names.append(name)

        async def advance(self, fraction: float) -> None:
            return None

        async def sleep(self, seconds: float) -> None:
            return None

    steps = Steps()
    result = await Report().run({"dataset": "debian"}, steps)
    assert steps.names == ["read", "parse", "analyse", "summarise"]
    assert result["first"]["codename"] == "Buzz"
    assert result["first"]["release"] == "1996-06-17"
    assert result["releases"] >= 18
    gaps = result["daysBetweenReleases"]
    assert gaps["count"] == result["releases"] - 1
    assert gaps["min"] <= gaps["median"] <= gaps["max"]


# Expiry of job records and topics, and long polls whose clients go.


def _topic_keys(job_id: str) -> list[str]:
    """The Redis keys of a job's topic, under the test's prefix."""
    prefix = os.environ["GATEWAY_REDIS_PREFIX"]
    return [f"{prefix}{{jobs/{job_id}}}:{kind}" for kind in ("seq", "history")]


async def _topic_forgotten(
    http: httpx.AsyncClient, gateway: Gateway, backend: str, job_id: str
) -> bool:
    """Whether polling the job's topic reads as an unknown topic, and no state of
    it is left: not in /admin/stats, nor (Redis) in keys."""
    poll = await http.get(f"{gateway.http_url}/topics/jobs/{job_id}/events?since=0")
    assert poll.status_code == 200, poll.text
    body = poll.json()
    if body["events"] or body["lastOffset"] != 0:
        return False
    assert body["nextOffset"] == 0 and body["firstOffset"] == 0, body
    stats = await admin_stats(http, gateway)
    if any(item["topic"] == f"jobs/{job_id}" for item in stats["topics"]):
        return False
    if backend == "redis":
        client = redis.asyncio.Redis.from_url(os.environ["GATEWAY_REDIS_URL"])
        try:
            return await client.exists(*_topic_keys(job_id)) == 0
        finally:
            await client.aclose()
    return True


async def test_a_finished_jobs_topic_expires_with_its_record(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """With --job-ttl 1, once a finished job's record is gone (404) its topic is
    too: a poll of jobs/<id> from 0 answers no events and offset 0, as for a topic
    never published on, and neither /admin/stats nor Redis keeps any of it."""
    with running_gateway(tmp_path, job_ttl=1) as gateway:
        posted = await submit(http, gateway, "report")
        job_id = posted["id"]
        await follow(http, gateway, job_id, finished)
        url = f"{gateway.http_url}/topics/jobs/{job_id}/events?since=0"
        types = [e["eventType"] for e in (await http.get(url)).json()["events"]]
        assert types[0] == "JOB_QUEUED" and types[-1] == "JOB_SUCCEEDED", types
        if backend == "redis":
            client = redis.asyncio.Redis.from_url(os.environ["GATEWAY_REDIS_URL"])
            try:
                for key in _topic_keys(job_id):
                    assert 0 < await client.pttl(key) <= 1000, key
            finally:
                await client.aclose()

        async def record_gone() -> bool:
            return (await get_job(http, gateway, job_id)).status_code == 404

        async def topic_gone() -> bool:
            return await _topic_forgotten(http, gateway, backend, job_id)

        await wait_until(record_gone, 5, "finished job expired")
        await wait_until(topic_gone, 3, "its topic expired")
        assert_no_error_logged(gateway)


async def test_the_topic_of_a_job_cancelled_while_queued_expires(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """A job cancelled while queued (no worker ran it) has its topic forgotten
    --job-ttl after its cancel, like one a worker finished."""
    with running_gateway(tmp_path, job_ttl=1, job_workers=0) as gateway:
        posted = await submit(http, gateway)
        job_id = posted["id"]
        cancelled = await http.delete(f"{gateway.http_url}/jobs/{job_id}", headers=AUTH)
        assert cancelled.status_code == 200, cancelled.text

        async def topic_gone() -> bool:
            return await _topic_forgotten(http, gateway, backend, job_id)

        await wait_until(topic_gone, 4, "the cancelled job's topic expired")
        assert (await get_job(http, gateway, job_id)).status_code in (200, 404)


async def test_memory_backend_forgets_an_expired_topic() -> None:
    """MemoryBackend.expire_topic drops the topic's history, last offset and timer
    once its time is up, and another topic is untouched."""
    backend = MemoryBackend(history_size=10)
    drafts = [Draft(t, "tests", "THING_HAPPENED", {}) for t in ("jobs/a", "keep/b")]
    await backend.publish(drafts, max_bytes=10_000)
    await backend.expire_topic("jobs/a", 0.05)
    assert (await backend.read_history("jobs/a", 0, 10)).last_offset == 1
    await asyncio.sleep(0.2)
    read = await backend.read_history("jobs/a", 0, 10)
    assert (list(read.events), read.first_offset, read.last_offset) == ([], 0, 0)
    assert "jobs/a" not in backend._history
    assert "jobs/a" not in backend._last_offset
    assert not backend._expiries
    assert [s.name for s in await backend.topic_stats()] == ["keep/b"]
    await backend.close()


async def test_a_job_queued_and_a_step_longer_than_job_ttl_still_run(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """--job-ttl 2 bounds finished jobs only: in a one-worker pool, a job whose one
    step lasts 3 s without a record write, and a job queued behind it for over
    2 s, both run and succeed; the first is readable throughout its step."""
    with running_gateway(tmp_path, job_ttl=2, job_workers=1) as gateway:
        ahead = await submit(
            http, gateway, step_seconds=0, durations={"snapshot": 3.0}, ticks=1
        )
        behind = await submit(http, gateway, step_seconds=0.1, ticks=1)
        await follow(http, gateway, ahead["id"], lambda j: j["step"] is not None)
        await asyncio.sleep(2.5)
        mid_step = await get_job(http, gateway, ahead["id"])
        assert mid_step.status_code == 200, mid_step.text
        assert mid_step.json()["step"]["name"] == "snapshot"
        queued = await get_job(http, gateway, behind["id"])
        assert queued.status_code == 200, queued.text
        assert queued.json()["state"] == "queued"

        last = (await follow(http, gateway, behind["id"], finished, 15))[-1]
        assert last["state"] == "succeeded", last
        assert iso(last["startedAt"]) - iso(last["createdAt"]) > 2, last
        first = (await follow(http, gateway, ahead["id"], finished, 5))[-1]
        assert first["state"] == "succeeded", first
        log = gateway.log()
        assert "took over" not in log, log
        assert_no_error_logged(gateway)


async def test_redis_records_expire_only_once_finished(shared_redis: str) -> None:
    """A queued or running record keeps the long unfinished time to live (renewed
    by the lease keeper while running), and gets the job ttl when it finishes."""
    store = await _redis_store(shared_redis)
    client = store._client()
    key = None
    try:
        job = _new_job()
        key = store._key(job.id)
        await store.reserve(job.id)
        await store.create(job)
        assert await client.pttl(key) > (UNFINISHED_TTL - 60) * 1000
        delivery = (await store.take(1, 0.1))[0]
        lease = await store.acquire(delivery, 5)
        assert lease is not None
        await store.update(job.id, {"state": JobState.RUNNING, "attempts": 1})
        lease.attempt = 1
        await client.pexpire(key, 10_000)
        assert await store.renew(lease, 5)
        assert await client.pttl(key) > (UNFINISHED_TTL - 60) * 1000
        final = {"state": JobState.SUCCEEDED, "finished_at": time.time()}
        update = await store.update(job.id, final, lease=lease)
        assert update is not None and update.applied
        assert 0 < await client.pttl(key) <= 60_000
        # A renewal racing the final write leaves the finished record's ttl.
        await store.renew(lease, 5)
        assert 0 < await client.pttl(key) <= 60_000
    finally:
        await store.close()


async def test_long_polls_stop_when_their_clients_go(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """50 long polls of 30 s over raw sockets are counted in gateway_long_polls;
    once their clients close the sockets, every one ends within a second."""
    with running_gateway(tmp_path, job_workers=0) as gateway:
        posted = await submit(http, gateway)
        job_id = posted["id"]
        etag = (await get_job(http, gateway, job_id)).headers["etag"]
        request = (
            f"GET /jobs/{job_id}?wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"If-None-Match: {etag}\r\n\r\n"
        ).encode()
        writers = []
        for _ in range(50):
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(request)
            writers.append(writer)

        def polls(count: int) -> Callable[[], Awaitable[bool]]:
            async def reached() -> bool:
                samples = await read_metrics(http, gateway)
                return samples["gateway_long_polls"] == count

            return reached

        await wait_until(polls(50), 5, "50 long polls waiting")
        for writer in writers:
            writer.close()
        closed = time.monotonic()
        await wait_until(polls(0), 1, "long polls ended with their clients")
        assert time.monotonic() - closed < timeout(1)
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        # The job is still there to poll, and a poll that stays is answered.
        waited = await get_job(http, gateway, job_id, etag=etag, wait=0.3)
        assert waited.status_code == 304
        assert_no_error_logged(gateway)


async def test_a_long_poll_on_any_etag_returns_at_the_first_change(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """If-None-Match: * answers 304 for a job that exists; with ?wait=N it holds
    the poll until the job's first change and answers 200 with the new state, or
    304 after N s without one."""
    with running_gateway(tmp_path, job_workers=0) as gateway:
        posted = await submit(http, gateway)
        job_id = posted["id"]
        assert (await get_job(http, gateway, job_id, etag="*")).status_code == 304

        started = time.monotonic()
        quiet = await get_job(http, gateway, job_id, etag="*", wait=0.6)
        assert quiet.status_code == 304
        assert time.monotonic() - started >= 0.55

        async def cancel_soon() -> httpx.Response:
            await asyncio.sleep(0.5)
            return await http.delete(f"{gateway.http_url}/jobs/{job_id}", headers=AUTH)

        started = time.monotonic()
        long_poll, cancel = await asyncio.gather(
            get_job(http, gateway, job_id, etag="*", wait=20), cancel_soon()
        )
        assert cancel.status_code == 200, cancel.text
        assert long_poll.status_code == 200, long_poll.text
        assert long_poll.json()["state"] == "cancelled"
        assert time.monotonic() - started < timeout(2)
