"""The stock price feed: replays real historical prices through ``POST /events``.

By default it reads ``stocks.csv`` of the ``vega_datasets`` package (monthly prices
of five companies, 2000 to 2010); any CSV with the columns ``symbol``, ``time`` (or
``date``) and ``price`` will do. Prices go out in market-time order, one
``PRICE_CHANGED`` event each on ``stocks/<SYMBOL>``, paced either at a steady number
of events per second (``rate``) or by market time sped up (``speed``).
"""

from __future__ import annotations

import asyncio
import csv
import importlib.metadata
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

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

__all__ = ["Price", "default_prices_path", "load_prices", "price_event", "run"]

logger = logging.getLogger(__name__)

#: The event source of every event this producer sends.
SOURCE = "stocks-producer"
#: Most events in one request; the gateway's default limit is 1000.
_MAX_BATCH = 500
#: Shortest pause between two requests, in seconds: above 100 events per second
#: the due events go out together, keeping the rate without a request each.
_TICK = 0.01
_TIME_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%b %d %Y")


@dataclass(frozen=True, slots=True)
class Price:
    """One price of one symbol at one market time."""

    symbol: str
    time: datetime
    price: float


def default_prices_path() -> Path:
    """Where the ``vega_datasets`` package keeps its stock prices.

    The file is found through the package's metadata, without importing it (its
    import loads pandas).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    try:
        distribution = importlib.metadata.distribution("vega_datasets")
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "the vega_datasets package is not installed; name a CSV file"
        ) from exc
    return Path(str(distribution.locate_file("vega_datasets/_data/stocks.csv")))


def _parse_time(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        for form in _TIME_FORMATS:
            try:
                parsed = datetime.strptime(text, form)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"unknown time format: {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def load_prices(
    path: Path | None = None, symbols: Iterable[str] | None = None
) -> list[Price]:
    """Read prices in market-time order (file order among equal times).

    Args:
        path: a CSV with ``symbol``, ``time`` (or ``date``) and ``price``
            columns; the ``vega_datasets`` stock prices when None.
        symbols: keep only these symbols; all when None.

    Raises:
        ValueError: a row is malformed, or no price is left; the message says
            which line.
    """
    path = path or default_prices_path()
    wanted = {symbol.upper() for symbol in symbols} if symbols else None
    prices = []
    with path.open(newline="", encoding="utf-8") as file:
        for line, row in enumerate(csv.DictReader(file), start=2):
            try:
                symbol = row["symbol"].strip().upper()
                when = _parse_time((row.get("time") or row["date"]).strip())
                price = float(row["price"])
            except (KeyError, AttributeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: bad row: {exc}") from exc
            if wanted is None or symbol in wanted:
                prices.append(Price(symbol, when, price))
    if not prices:
        raise ValueError(f"{path}: no prices for symbols {sorted(wanted or [])}")
    # sorted() is stable: prices of one time keep the file's order.
    return sorted(prices, key=lambda item: item.time)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def price_event(price: Price, previous: float | None, sent_at: float) -> dict[str, Any]:
    """The publish item for one price, given the symbol's previous price."""
    change = None
    if previous:
        change = round((price.price - previous) / previous * 100, 4)
    return {
        "topic": f"stocks/{price.symbol}",
        "eventSource": SOURCE,
        "eventType": "PRICE_CHANGED",
        "eventDetails": {
            "symbol": price.symbol,
            "price": price.price,
            "previousPrice": previous,
            "changePercent": change,
            "marketTime": _iso(price.time),
            "sentAt": _iso(datetime.fromtimestamp(sent_at, UTC)),
        },
    }


class _Publisher:
    """Posts batches to ``/events``, retrying those that may pass later."""

    def __init__(
        self, client: httpx.AsyncClient, url: str, api_key: str, retries: int
    ) -> None:
        self.client = client
        self.url = f"{url}/events"
        self.headers = {"Authorization": f"Bearer {api_key}"}
        # Retries allowed per batch.
        self.retries = retries
        # Retries made over this publisher's life, those of batches that failed
        # for good or were cut short included: the run's total.
        self.retries_made = 0

    async def post(self, items: list[dict[str, Any]]) -> int:
        """Publish one batch; return the retries it took.

        Every retry also counts in ``retries_made``, whatever the batch's fate.

        Raises:
            DeliveryError: refused, or still failing after every retry; its
                ``retries`` says how many were made.
        """
        delays = backoff_delays(self.retries, base=0.2, cap=5.0)
        # One key for every attempt of this batch: a retry after an answer that
        # was lost (a timeout, a 503 while Redis froze) is not stored twice.
        headers = {**self.headers, "Idempotency-Key": uuid.uuid4().hex}
        attempt = 0
        while True:
            try:
                response = await self.client.post(self.url, json=items, headers=headers)
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    return attempt
                reason = f"HTTP {response.status_code}: {response.text[:200]}"
                if not is_retryable(response):
                    raise DeliveryError(
                        f"{len(items)} prices refused: {reason}",
                        status=response.status_code,
                        retries=attempt,
                    )
            delay = next(delays, None)
            if delay is None:
                raise DeliveryError(
                    f"{len(items)} prices not sent after {attempt + 1} attempts: "
                    f"{reason}",
                    retries=attempt,
                )
            attempt += 1
            logger.warning(
                "publish failed (%s); retry %d in %.2f s", reason, attempt, delay
            )
            await asyncio.sleep(delay)
            self.retries_made += 1


def _offsets(
    prices: list[Price], *, rate: float | None, speed: float | None
) -> list[float]:
    """Seconds from the start of a pass at which each price is due."""
    if speed is not None:
        first = prices[0].time
        return [(item.time - first).total_seconds() / speed for item in prices]
    assert rate is not None
    return [index / rate for index in range(len(prices))]


async def run(
    url: str,
    api_key: str,
    *,
    rate: float | None = 10.0,
    speed: float | None = None,
    duration: float | None = None,
    loop: bool = False,
    symbols: Iterable[str] | None = None,
    path: Path | None = None,
    retries: int = 5,
    wait: float = 30.0,
    until_stdin_closes: bool = False,
) -> Totals:
    """Replay prices to the gateway at ``url``.

    Args:
        url: the gateway's base URL, such as ``http://127.0.0.1:8000``.
        api_key: the gateway's publish API key.
        rate: events per second, steady; used when ``speed`` is None.
        speed: market seconds replayed per second, instead of a fixed rate.
        duration: seconds to run at most; until the data ends when None.
        loop: start again at the end of the data.
        symbols: the symbols to send; all when None.
        path: the CSV file; the ``vega_datasets`` stock prices when None.
        retries: retries of a failing request before its prices fail for good.
        wait: seconds to wait for the gateway to be ready at start.
        until_stdin_closes: stop when standard input ends.

    Returns:
        The prices sent and failed, and the retries made.

    Raises:
        ValueError: ``url`` is no http(s) URL, or neither or both of ``rate``
            and ``speed`` are usable.
        DeliveryError: the gateway was not ready in time, or refused the API key.
    """
    check_gateway_url(url)
    if (rate is None) == (speed is None) or (rate or speed or 0) <= 0:
        raise ValueError("give one of rate and speed, above 0")
    prices = load_prices(path, symbols)
    offsets = _offsets(prices, rate=rate, speed=speed)
    totals = Totals()
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=10.0) as client:
        with stop_signals(stop, until_stdin_closes=until_stdin_closes):
            await wait_ready(client, url, within=wait)
            publisher = _Publisher(client, url, api_key, retries)
            pace = f"{rate} events/s" if speed is None else f"{speed}x market time"
            logger.info(
                "replaying %d prices of %s to %s at %s",
                len(prices),
                ",".join(sorted({item.symbol for item in prices})),
                url,
                pace,
            )
            await run_until(
                _replay(prices, offsets, publisher, totals, loop=loop),
                stop=stop,
                duration=duration,
            )
            totals.retries = publisher.retries_made
    logger.info(
        "stock feed done: %d prices sent, %d failed, %d retries",
        totals.sent,
        totals.failed,
        totals.retries,
    )
    return totals


async def _replay(
    prices: list[Price],
    offsets: list[float],
    publisher: _Publisher,
    totals: Totals,
    *,
    loop: bool,
) -> None:
    # A new pass starts one average interval after the last price: exactly one
    # interval with a fixed rate.
    period = offsets[-1] + max(offsets[-1] / max(1, len(offsets) - 1), _TICK)
    started = time.monotonic()
    while True:
        # Each pass starts with no previous price: the jump from the data's
        # last price back to its first is no market move.
        previous: dict[str, float] = {}
        index = 0
        while index < len(prices):
            ahead = offsets[index] - (time.monotonic() - started)
            if ahead > 0:
                # Pacing on the schedule, not synchronisation. At least a tick,
                # so that at high rates the events due meanwhile share a request.
                await asyncio.sleep(max(_TICK, ahead))
            end = _batch_end(offsets, index, time.monotonic() - started)
            sent_at = time.time()
            items = []
            for item in prices[index:end]:
                items.append(price_event(item, previous.get(item.symbol), sent_at))
                previous[item.symbol] = item.price
            try:
                await publisher.post(items)
                totals.sent += len(items)
            except DeliveryError as exc:
                totals.failed += len(items)
                if exc.status in (401, 403):
                    # Every later request would be refused the same way.
                    raise
                logger.error("%s", exc)
            logger.debug("sent %d prices", len(items))
            index = end
        if not loop:
            return
        started += period


def _batch_end(offsets: list[float], index: int, now: float) -> int:
    """The end of the batch from ``index``: every price due by ``now``, at least one."""
    end = index + 1
    while end < len(offsets) and offsets[end] <= now and end - index < _MAX_BATCH:
        end += 1
    return end
