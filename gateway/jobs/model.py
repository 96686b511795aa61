"""The job record: its states, its public form and the ETag of that form."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

__all__ = [
    "FINISHED",
    "Job",
    "JobState",
    "job_topic",
    "new_job_id",
]


class JobState(StrEnum):
    """Where a job is in its life; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

#: Bytes of randomness in a job id: 192 bits, written as 32 URL-safe characters.
_ID_BYTES = 24


def new_job_id() -> str:
    """A fresh job id: the valet key that lets its holder read the job's state.

    It is also a topic level (``jobs/<id>``), so it uses only characters the topic
    grammar accepts.
    """
    return secrets.token_urlsafe(_ID_BYTES)


def job_topic(job_id: str) -> str:
    """The topic a job's events are published on."""
    return f"jobs/{job_id}"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Job:
    """One job as stored; every change gives a new instance with a higher version.

    Attributes:
        id: the job id, also its valet key.
        kind: the name of the job kind that runs it.
        params: the validated parameters.
        state: where the job is in its life.
        progress: percent done, 0 to 100, never lower than before within one run.
        step: the name of the step running, or the last one run.
        step_index: index of ``step`` among the kind's steps, from 0.
        step_count: how many steps the job has.
        created_at: when it was submitted, in seconds since the epoch.
        started_at: when its current run started.
        updated_at: when the record last changed.
        finished_at: when it reached a final state.
        result: what a succeeded job produced.
        error: ``{"code", "message"}`` for a failed job.
        version: counts changes, from 1; a long poll waits for it to move.
        cancel_requested: a cancel arrived while the job ran; it stops within
            about a second if its kind waits through ``Progress.sleep``, else at
            its next step boundary.
        attempts: how many runs started; above 1 when a worker died or hung
            mid-job and another one took the job over. A worker that only lost
            Redis for a while carries on under the same attempt.
        worker: the name of the process that runs or ran it.
    """

    id: str
    kind: str
    params: dict[str, Any]
    state: JobState = JobState.QUEUED
    progress: int = 0
    step: str | None = None
    step_index: int = 0
    step_count: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    version: int = 1
    cancel_requested: bool = False
    attempts: int = 0
    worker: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the job reached a final state."""
        return self.state in FINISHED

    @property
    def topic(self) -> str:
        """The topic its events are published on."""
        return job_topic(self.id)

    def replace(self, **changes: Any) -> Job:
        """A copy with ``changes`` applied; the version is not touched."""
        return dataclasses.replace(self, **changes)

    def public(self) -> dict[str, Any]:
        """The job as clients see it, in ``GET /jobs/{id}`` and in its events."""
        step = None
        if self.step is not None:
            step = {
                "name": self.step,
                "index": self.step_index + 1,
                "count": self.step_count,
            }
        return {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "state": self.state.value,
            "progress": self.progress,
            "step": step,
            "createdAt": _iso(self.created_at),
            "startedAt": _iso(self.started_at),
            "updatedAt": _iso(self.updated_at),
            "finishedAt": _iso(self.finished_at),
            "result": self.result,
            "error": self.error,
            "cancelRequested": self.cancel_requested,
            "attempts": self.attempts,
            "topic": self.topic,
        }

    def body_and_etag(self) -> tuple[bytes, str]:
        """The encoded public form and its strong ETag.

        The ETag hashes the job id with the body, so two jobs in the same state
        never share one, and a client cannot be answered 304 for the wrong job.
        """
        body = orjson.dumps(self.public())
        digest = hashlib.blake2b(self.id.encode() + b"\0" + body, digest_size=16)
        return body, f'"{digest.hexdigest()}"'
