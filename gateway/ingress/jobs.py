"""The jobs API: start a job, poll or long-poll its state, cancel it.

``POST /jobs`` and ``DELETE /jobs/{id}`` need the operator's key or a publish key
with the ``jobs`` right (``gateway.security.keys``): the first starts work, the
second destroys it. ``GET /jobs/{id}`` needs only the id, which is the job's valet
key: at least 128 random bits; no subscription can list job ids (a job topic needs
its full id, unless read rights name the ``jobs`` tree).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import BadRequest, ClientError, Unavailable
from gateway.ingress.http import _check_api_key, _read_body, error_response
from gateway.jobs.model import Job
from gateway.jobs.service import JobService, UnknownKind
from gateway.runtime import Runtime

__all__ = ["MAX_WAIT", "etag_matches", "routes"]

logger = logging.getLogger(__name__)

#: Longest a long poll (``?wait=N``) may hold a request, in seconds.
MAX_WAIT = 30.0
#: Largest ``POST /jobs`` body, in bytes.
_MAX_BODY = 64 * 1024
#: Seconds a long poll sleeps between two checks that the replica is not draining.
_WAIT_SLICE = 0.5
#: What a job id looks like; anything else is answered 404 without a lookup.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{22,64}")
#: Shared caches must not keep job states: each belongs to one valet key holder,
#: and must be checked again on every poll.
CACHE_CONTROL = "private, no-cache"


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.state.gateway
    return runtime


def _jobs(request: Request) -> JobService:
    jobs: JobService = request.state.jobs
    return jobs


def _names_any(header: str | None) -> bool:
    """Tell whether an ``If-None-Match`` header holds ``*``."""
    return header is not None and any(
        candidate.strip() == "*" for candidate in header.split(",")
    )


def etag_matches(header: str | None, etag: str) -> bool:
    """Tell whether an ``If-None-Match`` header names ``etag`` (or is ``*``)."""
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


def _client_error(runtime: Runtime, exc: ClientError) -> Response:
    logger.debug("jobs request refused: %s: %s", exc.code, exc)
    runtime.metrics.client_errors.labels(exc.code).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, str(exc), headers)


def _unavailable(exc: Unavailable) -> Response:
    logger.debug("jobs request refused: %s", exc)
    return error_response(503, "unavailable", str(exc), {"Retry-After": "1"})


def _not_found(job_id: str) -> Response:
    return error_response(
        404, "not_found", f"no job {job_id[:64]!r}; it may have expired"
    )


def _job_response(
    job: Job, interval: int, *, status: int = 200, if_none_match: str | None = None
) -> Response:
    """The job's state with its ETag, or 304 when the client has that state."""
    body, etag = job.body_and_etag()
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if not job.finished:
        headers["Retry-After"] = str(interval)
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, status, headers=headers, media_type="application/json")


def _parse_submission(body: bytes) -> tuple[str, dict[str, object]]:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="bad_json") from exc
    if not isinstance(decoded, dict):
        raise BadRequest('body must be an object such as {"kind": "db-refresh"}')
    unknown = sorted(decoded.keys() - {"kind", "params"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    kind = decoded.get("kind")
    if not isinstance(kind, str) or not kind:
        raise BadRequest("kind: expected the name of a job kind")
    params = decoded.get("params", {})
    if not isinstance(params, dict):
        raise BadRequest("params: expected an object")
    return kind, params


async def submit_job(request: Request) -> Response:
    """POST /jobs: start a job; 202 with its id, status URL and topic."""
    runtime = _runtime(request)
    jobs = _jobs(request)
    try:
        _check_api_key(request, runtime).check_jobs()
        kind, params = _parse_submission(await _read_body(request, _MAX_BODY))
        try:
            job = await jobs.submit(kind, params)
        except UnknownKind as exc:
            raise BadRequest(
                f"unknown job kind {kind[:64]!r}; known: {jobs.kinds.names()}",
                code="unknown_kind",
            ) from exc
    except ClientDisconnect:
        logger.debug("client disconnected before its body was complete")
        return Response(status_code=400)
    except ClientError as exc:
        return _client_error(runtime, exc)
    except Unavailable as exc:
        return _unavailable(exc)
    interval = runtime.settings.poll_interval
    location = f"/jobs/{job.id}"
    return JSONResponse(
        {
            "id": job.id,
            "statusUrl": location,
            "topic": job.topic,
            "pollInterval": interval,
            "job": job.public(),
        },
        202,
        headers={
            "Location": location,
            "Retry-After": str(interval),
            "Cache-Control": CACHE_CONTROL,
        },
    )


def _wait_seconds(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:
        raise BadRequest(
            f"wait: expected seconds from 0 to {MAX_WAIT:g}, not {raw[:20]!r}"
        )
    return wait


async def job_status(request: Request) -> Response:
    """GET /jobs/{id}: the job's state; ``?wait=N`` holds it until a change."""
    runtime = _runtime(request)
    jobs = _jobs(request)
    job_id: str = request.path_params["job_id"]
    if_none_match = request.headers.get("if-none-match")
    try:
        wait = _wait_seconds(request)
        job = await jobs.get(job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            return _not_found(job_id)
        first_etag = job.body_and_etag()[1]
        if wait > 0 and _holds(job, if_none_match, first_etag, runtime):
            waited = await _long_poll(request, jobs, runtime, job, if_none_match, wait)
            if waited is None:
                return _not_found(job_id)
            job = waited
    except _ClientGone:
        # Nobody reads this answer; the connection is closed already.
        logger.debug("long poll of job %s ended: client gone", job_id)
        return Response(status_code=204)
    except ClientError as exc:
        return _client_error(runtime, exc)
    except Unavailable as exc:
        return _unavailable(exc)
    if _names_any(if_none_match) and job.body_and_etag()[1] != first_etag:
        # '*' held the poll until the job changed: the client wants that change.
        if_none_match = None
    return _job_response(
        job, runtime.settings.poll_interval, if_none_match=if_none_match
    )


class _ClientGone(Exception):
    """The client disconnected during its long poll."""


def _holds(job: Job, if_none_match: str | None, first: str, runtime: Runtime) -> bool:
    """Whether a long poll keeps waiting on ``job``.

    It waits while the client already has the current state and there is
    something left to happen. ``*`` names any state, so it waits only until the
    first change after ``first``, the ETag the poll started with.
    """
    etag = job.body_and_etag()[1]
    return (
        not job.finished
        and etag_matches(if_none_match, etag)
        and (etag == first or not _names_any(if_none_match))
        and not runtime.draining
    )


async def _long_poll(
    request: Request,
    jobs: JobService,
    runtime: Runtime,
    job: Job,
    if_none_match: str | None,
    wait: float,
) -> Job | None:
    """Wait ``wait`` seconds at most for ``job`` to change, or for the client to go.

    Returns:
        The job as it then is; None once it is gone (expired).

    Raises:
        _ClientGone: the client disconnected first; nothing reads for it since.
        Unavailable: the store cannot be reached.
    """
    loop = asyncio.get_running_loop()
    change = loop.create_task(_wait_change(jobs, runtime, job, if_none_match, wait))
    gone = loop.create_task(_client_gone(request))
    jobs.metrics.long_polls.inc()
    try:
        await asyncio.wait({change, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        change.cancel()
        gone.cancel()
        # Both end here, whatever ended the wait (the handler's own task may be
        # cancelled too, at shutdown), so that no read outlives the request.
        await asyncio.gather(change, gone, return_exceptions=True)
        jobs.metrics.long_polls.dec()
    if change.cancelled():
        raise _ClientGone
    return change.result()


async def _wait_change(
    jobs: JobService,
    runtime: Runtime,
    job: Job,
    if_none_match: str | None,
    wait: float,
) -> Job | None:
    """The job once ``_holds`` stops holding or ``wait`` s passed; None if gone."""
    first = job.body_and_etag()[1]
    deadline = time.monotonic() + wait
    while _holds(job, if_none_match, first, runtime):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        # In slices, so that a draining replica lets its long polls go.
        await jobs.wait_change(job.id, job.version, min(left, _WAIT_SLICE))
        latest = await jobs.get(job.id)
        if latest is None:
            return None
        job = latest
    return job


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected.

    A GET's body, if any, is read and dropped on the way: nothing else reads it.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_job(request: Request) -> Response:
    """DELETE /jobs/{id}: cancel a queued job, or ask a running one to stop.

    Answers 200 with the job cancelled, 202 while a running job has yet to stop
    (within about a second in ``Progress.sleep``, else at its next step
    boundary), 409 for a job already finished otherwise.
    """
    runtime = _runtime(request)
    job_id: str = request.path_params["job_id"]
    try:
        _check_api_key(request, runtime).check_jobs()
        job = await _jobs(request).cancel(job_id) if _JOB_ID.fullmatch(job_id) else None
    except ClientError as exc:
        return _client_error(runtime, exc)
    except Unavailable as exc:
        return _unavailable(exc)
    if job is None:
        return _not_found(job_id)
    if job.finished and job.state.value != "cancelled":
        return error_response(
            409, "already_finished", f"job {job_id} already {job.state.value}"
        )
    return _job_response(
        job, runtime.settings.poll_interval, status=200 if job.finished else 202
    )


async def job_resource(request: Request) -> Response:
    """GET or DELETE /jobs/{id}: the job's state, or cancelling it."""
    if request.method == "DELETE":
        return await cancel_job(request)
    return await job_status(request)


routes = [
    Route("/jobs", submit_job, methods=["POST"]),
    # One route for both methods: a 405 names the methods of the first route
    # whose path matches, and its Allow header must list them all.
    Route("/jobs/{job_id}", job_resource, methods=["GET", "DELETE"]),
]
