"""The job kinds the gateway ships: ``db-refresh`` and ``report``."""

from __future__ import annotations

import csv
import io
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any

from gateway.jobs.kinds import JobFailed, JobKind, Progress, bad_params

__all__ = ["DbRefresh", "Report"]

#: Longest one step of ``db-refresh`` may be told to take, in seconds.
MAX_STEP_SECONDS = 600.0
#: Longest a whole ``db-refresh`` may be told to take, in seconds.
MAX_TOTAL_SECONDS = 1800.0
#: Most progress reports per step of ``db-refresh``.
MAX_TICKS = 100

_DATABASE = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _only_known(params: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise bad_params(f"unknown parameter {unknown[0]!r}; known: {sorted(known)}")


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_params(f"{name}: expected a number of seconds")
    if not 0 <= value <= MAX_STEP_SECONDS:
        raise bad_params(f"{name}: {value} is outside 0 to {MAX_STEP_SECONDS:g} s")
    return float(value)


class DbRefresh(JobKind):
    """The QA database refresh: snapshot production, drop QA, restore, sanitize.

    The steps are simulated: each waits its configured duration, reporting its
    progress ``ticks`` times, so that clients see the job move as a real refresh
    would. A cancel ends the wait at once. Parameters:

    - ``step_seconds`` (default 0.5): duration of every step;
    - ``durations``: per step name, a duration overriding ``step_seconds``;
    - ``ticks`` (default 5): progress reports per step, so 5 % apart by default;
    - ``database`` (default ``qa``): the name of the database refreshed;
    - ``fail_at``: a step name at which the job fails, to rehearse failures.
    """

    name = "db-refresh"
    STEPS = ("snapshot", "drop", "restore", "sanitize")

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        _only_known(
            params, {"step_seconds", "durations", "ticks", "database", "fail_at"}
        )
        step_seconds = _seconds(params.get("step_seconds", 0.5), "step_seconds")
        durations = dict.fromkeys(self.STEPS, step_seconds)
        given = params.get("durations", {})
        if not isinstance(given, dict):
            raise bad_params("durations: expected an object of step name to seconds")
        for step, value in given.items():
            if step not in durations:
                raise bad_params(f"durations: unknown step {step!r}")
            durations[step] = _seconds(value, f"durations.{step}")
        if sum(durations.values()) > MAX_TOTAL_SECONDS:
            raise bad_params(f"the steps take over {MAX_TOTAL_SECONDS:g} s in all")
        ticks = params.get("ticks", 5)
        if isinstance(ticks, bool) or not isinstance(ticks, int):
            raise bad_params("ticks: expected an integer")
        if not 1 <= ticks <= MAX_TICKS:
            raise bad_params(f"ticks: {ticks} is outside 1 to {MAX_TICKS}")
        database = params.get("database", "qa")
        if not isinstance(database, str) or not _DATABASE.fullmatch(database):
            raise bad_params("database: expected a lowercase name such as qa")
        fail_at = params.get("fail_at")
        if fail_at is not None and fail_at not in self.STEPS:
            raise bad_params(f"fail_at: expected one of {list(self.STEPS)}")
        return {
            "durations": durations,
            "ticks": ticks,
            "database": database,
            "fail_at": fail_at,
        }

    def steps(self, params: Mapping[str, Any]) -> Sequence[str]:
        return self.STEPS

    async def run(self, params: Mapping[str, Any], progress: Progress) -> Any:
        started = time.monotonic()
        ticks: int = params["ticks"]
        for step in self.STEPS:
            await progress.step(step)
            if step == params["fail_at"]:
                raise JobFailed("step_failed", f"{step} failed, as asked by fail_at")
            pause = params["durations"][step] / ticks
            for tick in range(1, ticks + 1):
                # Waiting on the cancel signal, not a plain sleep, so that a
                # cancel ends even a 10-minute step within about a second.
                await progress.sleep(pause)
                # The last tick ends the step; the next step's start reports it.
                if tick < ticks:
                    await progress.advance(tick / ticks)
        return {
            "database": params["database"],
            "steps": list(self.STEPS),
            "seconds": round(time.monotonic() - started, 3),
        }


class Report(JobKind):
    """A statistics report over the release history of Debian or Ubuntu.

    The input is a real data file shipped with the gateway (from the Debian
    package ``distro-info-data``, see ``gateway/jobs/data/README.md``): every
    release with its creation, release and end-of-life dates. The report gives the
    number of releases, the time between two releases and the length of support,
    as mean, median, shortest and longest. Parameters: ``dataset``, ``debian`` (the
    default) or ``ubuntu``.
    """

    name = "report"
    STEPS = ("read", "parse", "analyse", "summarise")
    DATASETS = ("debian", "ubuntu")

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        _only_known(params, {"dataset"})
        dataset = params.get("dataset", "debian")
        if dataset not in self.DATASETS:
            raise bad_params(f"dataset: expected one of {list(self.DATASETS)}")
        return {"dataset": dataset}

    def steps(self, params: Mapping[str, Any]) -> Sequence[str]:
        return self.STEPS

    async def run(self, params: Mapping[str, Any], progress: Progress) -> Any:
        await progress.step("read")
        name = f"{params['dataset']}.csv"
        text = resources.files("gateway.jobs").joinpath("data", name).read_text()

        await progress.step("parse")
        releases = _parse_releases(text)
        if len(releases) < 2:
            raise JobFailed("bad_input", f"{name} holds fewer than two releases")

        await progress.step("analyse")
        today = datetime.now(UTC).date()
        released = [r for r in releases if r.release <= today]
        gaps = [
            (later.release - earlier.release).days
            for earlier, later in zip(released, released[1:], strict=False)
        ]
        supported = [(r, r.eol) for r in released if r.eol is not None]
        support = [(eol - r.release).days for r, eol in supported]
        await progress.advance(0.5)
        longest = max(supported, key=lambda pair: pair[1] - pair[0].release)[0]

        await progress.step("summarise")
        return {
            "dataset": params["dataset"],
            "releases": len(released),
            "announced": len(releases) - len(released),
            "first": released[0].describe(),
            "latest": released[-1].describe(),
            "daysBetweenReleases": _summary(gaps),
            "daysOfSupport": _summary(support),
            "longestSupported": longest.describe(),
            "supportedToday": sorted(
                r.codename for r, eol in supported if eol >= today
            ),
        }


@dataclass(frozen=True, slots=True)
class _Release:
    version: str
    codename: str
    release: date
    eol: date | None

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "codename": self.codename,
            "release": self.release.isoformat(),
            "eol": self.eol.isoformat() if self.eol else None,
        }


def _parse_releases(text: str) -> list[_Release]:
    """Rows with a version and a release date, in release order."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if not row.get("version") or not row.get("release"):
            # Rolling suites (sid, experimental) have neither.
            continue
        eol = row.get("eol")
        rows.append(
            _Release(
                row["version"],
                row["codename"],
                date.fromisoformat(row["release"]),
                date.fromisoformat(eol) if eol else None,
            )
        )
    rows.sort(key=lambda r: r.release)
    return rows


def _summary(values: list[int]) -> dict[str, float]:
    return {
        "count": len(values),
        "mean": round(statistics.fmean(values), 1),
        "median": float(statistics.median(values)),
        "min": min(values),
        "max": max(values),
    }
