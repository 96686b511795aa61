"""The soccer fixtures feed: replays a real match's key events as signed webhooks.

It behaves like a third-party data provider. Each key event becomes one delivery to
``POST /webhooks/fixtures`` with a unique event id, signed with HMAC-SHA256 over a
timestamp and the exact body (see ``docs/webhooks.md``). A delivery that fails with
a 5xx, 408, 429 or a connection error is retried with exponential backoff and
jitter: same event id, same body, signed again with a fresh timestamp.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import orjson

from producers._delivery import (
    DeliveryError,
    Totals,
    backoff_delays,
    check_gateway_url,
    is_retryable,
    run_until,
    stop_signals,
    wait_ready,
)

__all__ = [
    "DEFAULT_MATCH",
    "KeyEvent",
    "Match",
    "WebhookSender",
    "load_match",
    "run",
    "signed_headers",
]

logger = logging.getLogger(__name__)

#: The match replayed unless another file is named.
DEFAULT_MATCH = "world-cup-2022-final.json"
#: Match minutes between two events of the same minute, so that a shoot-out
#: unfolds kick by kick rather than all at once.
_SAME_MINUTE_GAP = 0.5
_WEBHOOK_PATH = "/webhooks/fixtures"


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One key event of a match, as written in the data file."""

    minute: int
    type: str
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Match:
    """A fixture and its key events in the order they happened."""

    fixture: dict[str, str]
    events: list[KeyEvent]

    def schedule(self) -> list[float]:
        """When each event is due, in match minutes from the first one."""
        due = []
        clock = 0.0
        for index, item in enumerate(self.events):
            if index:
                previous = self.events[index - 1].minute
                clock += max(item.minute - previous, _SAME_MINUTE_GAP)
            due.append(clock)
        return due


def load_match(path: Path | None = None) -> Match:
    """Read a match file; the 2022 World Cup final when ``path`` is None.

    Raises:
        ValueError: the file is not a match file; the message says why.
    """
    if path is None:
        raw = resources.files("producers").joinpath("data", DEFAULT_MATCH).read_bytes()
    else:
        raw = path.read_bytes()
    data = orjson.loads(raw)
    try:
        fixture = {str(k): str(v) for k, v in data["fixture"].items()}
        events = [
            KeyEvent(int(item["minute"]), str(item["type"]), dict(item["details"]))
            for item in data["events"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a match file: {exc!r}") from exc
    minutes = [item.minute for item in events]
    if minutes != sorted(minutes):
        raise ValueError("match events must be in the order of their minutes")
    return Match(fixture, events)


def signed_headers(
    secret: bytes, body: bytes, *, at: float | None = None
) -> dict[str, str]:
    """The timestamp and signature headers of one attempt to deliver ``body``."""
    timestamp = str(int(time.time() if at is None else at))
    digest = hmac.new(
        secret, timestamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Webhook-Timestamp": timestamp,
        "X-Webhook-Signature": f"sha256={digest}",
    }


class WebhookSender:
    """Delivers webhook bodies to one URL, retrying the failures that may pass.

    Args:
        client: the HTTP client; its connections are reused between deliveries.
        url: the webhook's URL.
        secret: the shared signing secret.
        retries: attempts after the first before a delivery fails for good.
        backoff: ceiling of the first retry's delay, in seconds; doubles each time.
        max_backoff: the longest delay between two attempts, in seconds.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        secret: bytes,
        *,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.client = client
        self.url = url
        self.secret = secret
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        # Retries made over this sender's life, those of deliveries that failed
        # for good or were cut short included: a run's total.
        self.retries_made = 0

    async def deliver(self, event_id: str, body: bytes) -> int:
        """Deliver one body until it is acknowledged; return the retries it took.

        Every retry also counts in ``retries_made``, whatever the delivery's
        fate. Cancelling is safe: a delivery cut short may or may not have
        arrived, which the gateway's dedupe on the event id makes harmless on a
        later run.

        Raises:
            DeliveryError: refused (4xx other than 408 or 429), or still failing
                after every retry; its ``retries`` says how many were made.
        """
        delays = backoff_delays(self.retries, base=self.backoff, cap=self.max_backoff)
        attempt = 0
        while True:
            # Signed again on every attempt: a retry minutes later must not be
            # refused for an old timestamp.
            headers = signed_headers(self.secret, body)
            try:
                response = await self.client.post(
                    self.url, content=body, headers=headers
                )
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    return attempt
                reason = f"HTTP {response.status_code}: {response.text[:200]}"
                if not is_retryable(response):
                    raise DeliveryError(
                        f"delivery {event_id} refused: {reason}",
                        status=response.status_code,
                        retries=attempt,
                    )
            delay = next(delays, None)
            if delay is None:
                raise DeliveryError(
                    f"delivery {event_id} failed after {attempt + 1} attempts: "
                    f"{reason}",
                    retries=attempt,
                )
            attempt += 1
            logger.warning(
                "delivery %s failed (%s); retry %d in %.2f s",
                event_id,
                reason,
                attempt,
                delay,
            )
            await asyncio.sleep(delay)
            self.retries_made += 1


def _body(match: Match, item: KeyEvent, event_id: str) -> bytes:
    return orjson.dumps(
        {
            "id": event_id,
            "type": item.type,
            "fixture": match.fixture,
            "minute": item.minute,
            "details": item.details,
        }
    )


async def run(
    url: str,
    secret: str,
    *,
    speed: float = 1.0,
    duration: float | None = None,
    loop: bool = False,
    path: Path | None = None,
    retries: int = 6,
    wait: float = 30.0,
    until_stdin_closes: bool = False,
) -> Totals:
    """Replay a match to the gateway at ``url``.

    Args:
        url: the gateway's base URL, such as ``http://127.0.0.1:8000``.
        secret: the webhook secret the gateway was given.
        speed: match minutes replayed per second.
        duration: seconds to run at most; until the match ends when None.
        loop: start the match again at its end (with new event ids).
        path: the match file; the 2022 World Cup final when None.
        retries: retries of a failing delivery before it fails for good.
        wait: seconds to wait for the gateway to be ready at start.
        until_stdin_closes: stop when standard input ends.

    Returns:
        The deliveries made, failed and retried.

    Raises:
        ValueError: ``url`` is no http(s) URL, or the match file is not one.
        DeliveryError: the gateway was not ready in time, or refused a delivery
            with 401 or 403 (a wrong secret: every later one would be refused).
    """
    check_gateway_url(url)
    match = load_match(path)
    schedule = match.schedule()
    totals = Totals()
    stop = asyncio.Event()
    # One id per run, so that looping or restarting sends new events while a
    # retry within a run keeps its event's id.
    run_id = uuid.uuid4().hex[:12]
    async with httpx.AsyncClient(timeout=10.0) as client:
        with stop_signals(stop, until_stdin_closes=until_stdin_closes):
            await wait_ready(client, url, within=wait)
            sender = WebhookSender(
                client, url + _WEBHOOK_PATH, secret.encode(), retries=retries
            )
            logger.info(
                "replaying %s %s-%s (%d events) to %s at %.2f minutes per second",
                match.fixture.get("date"),
                match.fixture.get("home"),
                match.fixture.get("away"),
                len(match.events),
                url,
                speed,
            )
            await run_until(
                _replay(
                    match, schedule, sender, totals, run_id, speed=speed, loop=loop
                ),
                stop=stop,
                duration=duration,
            )
            totals.retries = sender.retries_made
    logger.info(
        "fixtures feed done: %d delivered, %d failed, %d retries",
        totals.sent,
        totals.failed,
        totals.retries,
    )
    return totals


async def _replay(
    match: Match,
    schedule: list[float],
    sender: WebhookSender,
    totals: Totals,
    run_id: str,
    *,
    speed: float,
    loop: bool,
) -> None:
    round_number = 0
    while True:
        started = time.monotonic()
        for index, (item, due) in enumerate(zip(match.events, schedule, strict=True)):
            # Pacing by the match clock, not synchronisation.
            await asyncio.sleep(max(0.0, started + due / speed - time.monotonic()))
            event_id = f"{run_id}-{round_number}-{index}"
            try:
                await sender.deliver(event_id, _body(match, item, event_id))
            except DeliveryError as exc:
                totals.failed += 1
                if exc.status in (401, 403):
                    # Every later delivery would be refused the same way.
                    raise DeliveryError(
                        f"{exc}; check --webhook-secret / GATEWAY_WEBHOOK_SECRET",
                        status=exc.status,
                        retries=exc.retries,
                    ) from exc
                logger.error("%s", exc)
                continue
            totals.sent += 1
            logger.debug(
                "delivered %s %s at minute %d", event_id, item.type, item.minute
            )
        if not loop:
            return
        round_number += 1
