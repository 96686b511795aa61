"""Job kinds: the plugin contract, the registry and how plugins are found.

A job kind validates its parameters, names its steps and runs them, reporting
progress through a ``Progress`` it is handed. The gateway ships ``db-refresh`` and
``report`` (see ``gateway.jobs.builtin``). More kinds come from the ``gateway.jobs``
entry point group of installed packages, and from ``module:attribute`` names given
in the ``job_kinds`` setting; each names a ``JobKind`` subclass or instance.
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol

from gateway.errors import BadRequest

__all__ = [
    "ENTRY_POINT_GROUP",
    "JobCancelled",
    "JobFailed",
    "JobKind",
    "KindRegistry",
    "Progress",
    "bad_params",
    "load_kinds",
    "named_kinds",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "gateway.jobs"


class JobFailed(Exception):
    """Raised by a job kind for a failure it foresaw; the job ends ``failed``.

    Args:
        code: a short machine-readable reason, such as ``bad_input``.
        message: what went wrong, for the client.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class JobCancelled(Exception):
    """Raised from ``Progress.step`` and ``Progress.sleep`` when a cancel arrived.

    Kinds let it pass.
    """


class Progress(Protocol):
    """What a running job uses to report where it is, and to learn of a cancel.

    ``step`` and ``advance`` are coroutines that write the job record and publish
    an event, so a kind calls them between pieces of work, never from another
    task. While the job store cannot be reached they wait until it can, so that
    the job carries on from where it was instead of failing.
    """

    async def step(self, name: str) -> None:
        """Start the next step, named as in ``JobKind.steps``.

        Raises:
            JobCancelled: a cancel arrived; the job ends here, at a step boundary.
        """

    async def advance(self, fraction: float) -> None:
        """Say how much of the current step is done, from 0.0 to 1.0."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the job is cancelled meanwhile.

        A kind that waits, or polls something outside, waits here so that a
        cancel ends the job within about a second rather than at the next step
        boundary.

        Raises:
            JobCancelled: a cancel arrived before or during the wait.
        """


def bad_params(message: str) -> BadRequest:
    """The error for parameters a kind refuses (HTTP 400, code ``bad_params``)."""
    return BadRequest(message, code="bad_params")


class JobKind(abc.ABC):
    """One kind of job. Instances hold no per-job state and may run many jobs."""

    #: The name clients give in ``POST /jobs``.
    name: str = ""

    @abc.abstractmethod
    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check the parameters and return them with defaults filled in.

        Raises:
            BadRequest: a parameter is missing, unknown or out of its bounds;
                ``bad_params`` builds one.
        """

    @abc.abstractmethod
    def steps(self, params: Mapping[str, Any]) -> Sequence[str]:
        """The names of the steps a job with these (valid) parameters runs."""

    @abc.abstractmethod
    async def run(self, params: Mapping[str, Any], progress: Progress) -> Any:
        """Do the work and return the result, an object encodable as JSON.

        Cancelling the task that runs this is how a worker abandons a job whose
        lease it lost; a kind must not swallow ``CancelledError``.

        Raises:
            JobFailed: the job cannot complete, for a reason the client should see.
            JobCancelled: from ``progress.step`` or ``progress.sleep``, when the
                client cancelled.
        """


class KindRegistry:
    """The job kinds a process knows, by name."""

    def __init__(self, kinds: Iterable[JobKind] = ()) -> None:
        self._kinds: dict[str, JobKind] = {}
        for kind in kinds:
            self.add(kind)

    def add(self, kind: JobKind) -> None:
        """Register a kind; a later kind of the same name replaces the earlier."""
        if not kind.name:
            raise ValueError(f"job kind {type(kind).__name__} has no name")
        self._kinds[kind.name] = kind

    def get(self, name: str) -> JobKind | None:
        """The kind called ``name``, or None."""
        return self._kinds.get(name)

    def names(self) -> list[str]:
        """The names of every registered kind, sorted."""
        return sorted(self._kinds)


def _instantiate(target: object, where: str) -> JobKind:
    if isinstance(target, type) and issubclass(target, JobKind):
        return target()
    if isinstance(target, JobKind):
        return target
    raise ValueError(f"{where} is not a JobKind subclass or instance")


def named_kinds(extra: str) -> list[JobKind]:
    """The kinds named in ``extra``, imported and made.

    The settings call this at load time, so that a wrong name stops the process
    with a usage error naming ``--job-kinds``.

    Args:
        extra: comma-separated ``module:attribute`` names of job kinds.

    Raises:
        ValueError: a name cannot be imported, is not a job kind, or names a
            kind without a name.
    """
    kinds = []
    for spec in filter(None, (item.strip() for item in extra.split(","))):
        module_name, _, attribute = spec.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"cannot load job kind {spec!r}: {exc}") from exc
        kind = _instantiate(target, spec)
        if not kind.name:
            raise ValueError(f"job kind {spec!r} has no name")
        kinds.append(kind)
    return kinds


def load_kinds(extra: str = "") -> KindRegistry:
    """The built-in kinds, then entry point plugins, then ``extra``.

    Args:
        extra: comma-separated ``module:attribute`` names of more kinds.

    Raises:
        ValueError: a name in ``extra`` cannot be imported or is not a job kind.
    """
    from gateway.jobs.builtin import DbRefresh, Report

    registry = KindRegistry([DbRefresh(), Report()])
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            registry.add(_instantiate(point.load(), f"entry point {point.name}"))
        except Exception:
            # A broken plugin must not keep the gateway from serving other kinds.
            logger.exception("job kind plugin %s failed to load", point.value)
    for kind in named_kinds(extra):
        registry.add(kind)
    return registry
