"""What both producers need: waiting for the gateway, backoff, stopping, totals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "DeliveryError",
    "Totals",
    "backoff_delays",
    "check_gateway_url",
    "is_retryable",
    "run_until",
    "stop_signals",
    "wait_ready",
]

logger = logging.getLogger(__name__)

#: Seconds between two readiness checks while waiting for the gateway.
_READY_POLL = 0.2


class DeliveryError(Exception):
    """A delivery failed for good: refused, or still failing after every retry.

    Attributes:
        status: the HTTP status of a refusal; None after retries ran out.
        retries: the retries made before the delivery failed for good.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retries: int = 0
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retries = retries


@dataclass
class Totals:
    """What a producer run did, reported at its end and in its exit status.

    Attributes:
        sent: items the gateway acknowledged.
        failed: items that failed for good.
        retries: every retry made, those of deliveries that finally failed too.
    """

    sent: int = 0
    failed: int = 0
    retries: int = 0


def check_gateway_url(url: str) -> None:
    """Refuse a gateway base URL that no request could reach.

    Checked at start, so that a typo fails at once rather than after the wait
    for the gateway to be ready.

    Raises:
        ValueError: ``url`` is not http:// or https:// with a host; the message
            names the option and the value.
    """
    problem = (
        f"--url / GATEWAY_URL: not an http:// or https:// URL with a host: {url!r}"
    )
    try:
        parts = urllib.parse.urlsplit(url)
        # Reading the port checks it: a port that is no number raises here.
        _ = parts.port
    except ValueError as exc:
        raise ValueError(problem) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(problem)


def backoff_delays(
    attempts: int,
    *,
    base: float,
    cap: float,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Seconds to wait before each retry: exponential, with full jitter.

    The n-th delay is drawn uniformly between half of and the whole of
    ``base * 2**n`` (at most ``cap``), so that many senders failing at once do
    not retry in step.

    Args:
        attempts: retries wanted; as many delays are yielded.
        base: the first delay's ceiling, in seconds.
        cap: the largest delay, in seconds.
        rng: the random source (for tests); a fresh one when None.
    """
    rng = rng or random.Random()
    for attempt in range(attempts):
        ceiling = min(cap, base * 2**attempt)
        yield rng.uniform(ceiling / 2, ceiling)


def is_retryable(response: httpx.Response) -> bool:
    """Whether a failed answer may succeed later: 5xx, 408 and 429."""
    return response.status_code >= 500 or response.status_code in (408, 429)


async def wait_ready(client: httpx.AsyncClient, url: str, *, within: float) -> None:
    """Wait until the gateway at ``url`` answers ``/readyz`` with 200.

    Raises:
        DeliveryError: it did not within ``within`` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(httpx.HTTPError):
            response = await client.get(f"{url}/readyz", timeout=2.0)
            if response.status_code == 200:
                return
        if time.monotonic() > deadline:
            raise DeliveryError(f"gateway at {url} not ready within {within:.0f} s")
        # Polling a peer that is starting; nothing to wait on but time.
        await asyncio.sleep(_READY_POLL)


@contextlib.contextmanager
def stop_signals(stop: asyncio.Event, *, until_stdin_closes: bool) -> Iterator[None]:
    """Set ``stop`` on SIGINT or SIGTERM, and when standard input ends if asked.

    A parent that starts a producer with a pipe as its standard input stops it
    by closing the pipe, and the producer stops too if the parent dies.
    """
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    if until_stdin_closes:

        def watch() -> None:
            # Unbuffered reads, so that no lock is held if the process exits
            # first; an empty read is the end of file: the parent closed the pipe.
            with contextlib.suppress(OSError):
                while os.read(sys.stdin.fileno(), 4096):
                    pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
    try:
        yield
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)


async def run_until(
    work: Coroutine[Any, Any, None], *, stop: asyncio.Event, duration: float | None
) -> None:
    """Run ``work`` until it returns, ``stop`` is set or ``duration`` seconds pass.

    Raises:
        Exception: whatever ``work`` raised.
    """
    task = asyncio.create_task(work)
    waiters = [task, asyncio.create_task(stop.wait())]
    done, _ = await asyncio.wait(
        waiters, timeout=duration, return_when=asyncio.FIRST_COMPLETED
    )
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    if task in done:
        # Re-raises what crashed the work, if anything did.
        task.result()
