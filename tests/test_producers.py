"""The stock and fixtures producers, end to end against real gateways, and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from services import MosquittoServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from support import (
    API_KEY,
    Gateway,
    assert_no_error_logged,
    free_port,
    running_gateway,
    timeout,
    wait_until,
    ws_client,
)
from test_mqtt import Listener, wait_connected

from gateway.ingress.webhooks import WebhookReceiver
from producers import fixtures as fixtures_feed
from producers import stocks as stocks_feed
from producers._delivery import (
    DeliveryError,
    Totals,
    backoff_delays,
    check_gateway_url,
)
from producers.fixtures import WebhookSender, load_match, signed_headers
from producers.stocks import default_prices_path, load_prices, price_event

SECRET = "producer-test-secret-0123456789"
FIXTURE_TOPIC = "fixtures/2022-12-18/ARG-FRA"
SCORING = {"GOAL_SCORED", "PENALTY_SCORED"}
#: The goals of the 2022 final, in match order: minute and team.
GOALS = [(23, "ARG"), (36, "ARG"), (80, "FRA"), (81, "FRA"), (108, "ARG"), (118, "FRA")]


def produce(gateway: Gateway, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """Start ``gateway produce ...`` against ``gateway``, logging to its folder."""
    environ = {
        **os.environ,
        "GATEWAY_API_KEY": API_KEY,
        "GATEWAY_WEBHOOK_SECRET": SECRET,
        **env,
    }
    log = open(gateway.log_path.with_suffix(f".{args[0]}.log"), "wb")
    with log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "produce",
                *args,
                "--url",
                gateway.http_url,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
        )


def producer_log(gateway: Gateway, command: str) -> str:
    return gateway.log_path.with_suffix(f".{command}.log").read_text()


# Pure logic.


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    """Each delay lies between half and all of base * 2**n, never above the cap."""
    delays = list(backoff_delays(6, base=0.5, cap=4.0, rng=random.Random(1)))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(delays) == 6
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == 6


def test_default_prices_are_the_packaged_file_in_market_order() -> None:
    """The default data is vega_datasets' stocks.csv, sorted by time, all rows."""
    path = default_prices_path()
    assert path.name == "stocks.csv" and path.exists()
    prices = load_prices()
    assert len(prices) == 560
    assert [p.time for p in prices] == sorted(p.time for p in prices)
    first_msft = next(p for p in prices if p.symbol == "MSFT")
    assert (first_msft.time.date().isoformat(), first_msft.price) == (
        "2000-01-01",
        39.81,
    )
    assert {p.symbol for p in load_prices(symbols=["aapl", "IBM"])} == {"AAPL", "IBM"}


def test_price_event_carries_the_change() -> None:
    """An event has price, previous price, change in percent and both times."""
    [price] = load_prices(symbols=["MSFT"])[:1]
    item = price_event(price, 40.0, sent_at=1_700_000_000.0)
    details = item["eventDetails"]
    assert item["topic"] == "stocks/MSFT" and item["eventType"] == "PRICE_CHANGED"
    assert details["previousPrice"] == 40.0
    assert details["changePercent"] == round((39.81 - 40) / 40 * 100, 4)
    assert details["marketTime"] == "2000-01-01T00:00:00.000Z"
    assert details["sentAt"] == "2023-11-14T22:13:20.000Z"
    assert price_event(price, None, 0)["eventDetails"]["changePercent"] is None


def test_match_file_holds_the_final_in_order() -> None:
    """The packaged match is the 2022 final: its goals in order, a shoot-out, an end."""
    match = load_match()
    assert match.fixture["date"] == "2022-12-18"
    goals = [(e.minute, e.details["team"]) for e in match.events if e.type in SCORING]
    assert goals == GOALS
    schedule = match.schedule()
    assert schedule == sorted(schedule) and len(set(schedule)) == len(schedule)
    assert match.events[-1].type == "MATCH_ENDED"
    kicks = [e for e in match.events if e.type.startswith("SHOOTOUT_KICK")]
    assert len(kicks) == 8


def test_producer_signature_is_what_the_gateway_verifies() -> None:
    """Headers made by the producer pass the gateway's check; a changed body fails."""
    receiver = WebhookReceiver(lambda: [SECRET.encode()], tolerance=300)
    body = b'{"id": "x"}'
    receiver.verify(signed_headers(SECRET.encode(), body), body)
    with pytest.raises(Exception, match="does not match"):
        receiver.verify(signed_headers(SECRET.encode(), body), body + b" ")


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "https://gateway.example.com", "http://[::1]:80/base"],
)
def test_gateway_url_with_http_and_a_host_passes(url: str) -> None:
    """An http or https URL with a host, a port or a path is a gateway URL."""
    check_gateway_url(url)


@pytest.mark.parametrize(
    "url", ["notaurl", "ftp://x", "http:", "https://", "127.0.0.1:8000", "http://x:y"]
)
def test_gateway_url_without_http_or_a_host_is_refused(url: str) -> None:
    """A value that is no http(s) URL with a host is refused, naming --url."""
    with pytest.raises(ValueError, match="^--url / GATEWAY_URL: .*") as caught:
        check_gateway_url(url)
    assert repr(url) in str(caught.value)


@pytest.mark.parametrize(
    ("command", "url"), [("stocks", "notaurl"), ("fixtures", "ftp://x")]
)
def test_producer_refuses_a_bad_url_at_once(command: str, url: str) -> None:
    """``gateway produce`` with a bad --url exits 1 at once, in one line naming
    --url, instead of waiting --wait seconds for a gateway it cannot reach."""
    environ = {
        **os.environ,
        "GATEWAY_API_KEY": API_KEY,
        "GATEWAY_WEBHOOK_SECRET": SECRET,
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "produce", command, "--url", url],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout(20),
    )
    elapsed = time.monotonic() - started
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert output.splitlines() == [
        f"Error: --url / GATEWAY_URL: not an http:// or https:// URL with a host: "
        f"{url!r}"
    ]
    # Python's start and imports only: far below the 30 s of --wait.
    assert elapsed < timeout(10), elapsed


# Retry counts, against a gateway stand-in that is always unavailable.


def always_unavailable(request: httpx.Request) -> httpx.Response:
    """Answer every request 503, as a gateway whose Redis is away does."""
    return httpx.Response(503, json={"error": {"code": "unavailable"}})


async def test_sender_counts_the_retries_of_failed_deliveries() -> None:
    """Retries of deliveries that fail for good count: in the error and in the
    sender's total, which adds up every delivery's."""
    transport = httpx.MockTransport(always_unavailable)
    async with httpx.AsyncClient(transport=transport) as client:
        sender = WebhookSender(
            client,
            "http://gateway.test/webhooks/fixtures",
            b"secret",
            retries=2,
            backoff=0.01,
        )
        for number in range(2):
            with pytest.raises(DeliveryError, match="after 3 attempts") as caught:
                await sender.deliver(f"down-{number}", b"{}")
            assert caught.value.retries == 2
    assert sender.retries_made == 4


class UnavailableGateway:
    """A stand-in gateway on a free port: ready, but answering every publish and
    every webhook delivery with 503, and counting them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Publish and delivery attempts received.
        self.attempts = 0
        app = Starlette(
            routes=[
                Route("/readyz", self.ready),
                Route("/events", self.refuse, methods=["POST"]),
                Route("/webhooks/fixtures", self.refuse, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, lifespan="off"
        )
        self.server = uvicorn.Server(config)

    async def ready(self, request: Request) -> Response:
        return JSONResponse({"status": "ready"})

    async def refuse(self, request: Request) -> Response:
        self.attempts += 1
        return JSONResponse({"error": {"code": "unavailable"}}, 503)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[UnavailableGateway]:
        task = asyncio.create_task(self.server.serve())

        async def started() -> bool:
            return bool(self.server.started)

        await wait_until(started, 5, "stand-in gateway started")
        try:
            yield self
        finally:
            self.server.should_exit = True
            await task


async def test_stock_totals_count_the_retries_of_failed_batches(
    tmp_path: Path,
) -> None:
    """The stock feed's totals count every retry, those of batches that failed
    for good included."""
    path = tmp_path / "two.csv"
    path.write_text("symbol,time,price\nACME,2024-01-02,1\nACME,2024-01-03,2\n")
    async with UnavailableGateway().running() as gateway:
        totals = await stocks_feed.run(
            gateway.url, API_KEY, rate=10.0, path=path, retries=1, wait=5
        )
    # Two batches of one price, each tried twice.
    assert totals == Totals(sent=0, failed=2, retries=2)
    assert gateway.attempts == 4


async def test_fixtures_totals_count_the_retries_of_failed_deliveries(
    tmp_path: Path,
) -> None:
    """The fixtures feed's totals count every retry, those of deliveries that
    failed for good included."""
    path = tmp_path / "match.json"
    match = {
        "fixture": {"date": "2024-01-02", "home": "AAA", "away": "BBB"},
        "events": [
            {"minute": 0, "type": "MATCH_STARTED", "details": {}},
            {"minute": 1, "type": "GOAL_SCORED", "details": {"team": "AAA"}},
        ],
    }
    path.write_bytes(orjson.dumps(match))
    async with UnavailableGateway().running() as gateway:
        totals = await fixtures_feed.run(
            gateway.url, SECRET, speed=600.0, path=path, retries=1, wait=5
        )
    assert totals == Totals(sent=0, failed=2, retries=2)
    assert gateway.attempts == 4


# The stock producer.


@pytest.mark.parametrize(
    ("rate", "symbols"), [(20.0, "AAPL,MSFT,IBM"), (200.0, "AAPL,MSFT,IBM,AMZN,GOOG")]
)
async def test_stock_producer_sends_real_prices_in_order_at_the_rate(
    tmp_path: Path, rate: float, symbols: str
) -> None:
    """The producer sends the data file's prices in order at the asked rate
    within 10 %, batched above 100 a second, and they all arrive."""
    count = int(rate * 2.5)
    with running_gateway(tmp_path) as gateway:
        async with ws_client(gateway) as ws:
            await ws.subscribe("stocks/#")
            process = produce(
                gateway, "stocks", "--rate", str(rate), "--symbols", symbols
            )
            try:
                arrivals = [await ws.recv(10) for _ in range(count)]
            finally:
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout(10)) == 0, producer_log(gateway, "stocks")
        assert_no_error_logged(gateway)
    expected = load_prices(symbols=symbols.split(","))[:count]
    got = [m["eventDetails"] for m in arrivals]
    assert [(d["symbol"], d["price"]) for d in got] == [
        (p.symbol, p.price) for p in expected
    ]
    assert got[0]["marketTime"] == "2000-01-01T00:00:00.000Z"
    # The rate by the send times the producer stamps, not by arrival times,
    # which a busy machine bunches. Skip the first second: the producer's own
    # start may bunch its first events.
    settled = [datetime.fromisoformat(d["sentAt"]) for d in got[int(rate) :]]
    measured = (len(settled) - 1) / (settled[-1] - settled[0]).total_seconds()
    assert abs(measured - rate) / rate < 0.10, measured


async def test_stock_producer_paces_a_named_csv_by_market_time(
    tmp_path: Path,
) -> None:
    """A CSV the user names is replayed with market time sped up, previous prices
    and changes per symbol, and the run ends at the end of the data."""
    path = tmp_path / "ticks.csv"
    rows = [
        ("ACME", "2024-01-02T10:00:00", "100"),
        ("ACME", "2024-01-02T10:00:02", "101"),
        ("INIT", "2024-01-02T10:00:04", "7.5"),
        ("ACME", "2024-01-02T10:00:06", "99.99"),
    ]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["symbol", "time", "price"])
        writer.writerows(rows)
    with running_gateway(tmp_path) as gateway:
        async with ws_client(gateway) as ws:
            await ws.subscribe("stocks/#")
            process = produce(gateway, "stocks", "--file", str(path), "--speed", "4")
            arrivals = []
            for _ in rows:
                message = await ws.recv(10)
                arrivals.append((time.monotonic(), message["eventDetails"]))
            assert process.wait(timeout(10)) == 0, producer_log(gateway, "stocks")
    details = [d for _, d in arrivals]
    assert [d["price"] for d in details] == [100, 101, 7.5, 99.99]
    assert [d["previousPrice"] for d in details] == [None, 100, None, 101]
    assert details[1]["changePercent"] == 1.0
    # Two market seconds apart at 4x: half a second between arrivals.
    gaps = [b - a for (a, _), (b, _) in zip(arrivals, arrivals[1:], strict=False)]
    assert all(0.3 < gap < timeout(0.9) for gap in gaps), gaps


async def test_stock_producer_exits_non_zero_when_refused(tmp_path: Path) -> None:
    """With a wrong API key the producer logs the refusal and exits with 1."""
    with running_gateway(tmp_path) as gateway:
        process = produce(
            gateway, "stocks", "--rate", "5", GATEWAY_API_KEY="wrong-key-123"
        )
        assert process.wait(timeout(15)) == 1
        log = producer_log(gateway, "stocks")
    assert "prices refused: HTTP 401" in log


# The fixtures producer.


@pytest.mark.timeout(90)
async def test_goals_reach_websocket_team_and_mqtt_fixture_subscribers_in_order(
    tmp_path: Path, backend: str
) -> None:
    """The replayed final reaches a WebSocket subscriber of teams/ARG and an MQTT
    subscriber of the fixture topic, every goal in match order, each event once."""
    broker = MosquittoServer(tmp_path)
    broker.start()
    try:
        with running_gateway(
            tmp_path, webhook_secret=SECRET, mqtt_url=broker.url()
        ) as gateway:
            wait_connected(gateway)
            match = load_match()
            async with (
                Listener(broker.port, FIXTURE_TOPIC) as listener,
                ws_client(gateway) as ws,
            ):
                await ws.subscribe("teams/ARG")
                process = produce(gateway, "fixtures", "--speed", "120")
                assert process.wait(timeout(30)) == 0, producer_log(gateway, "fixtures")
                by_ws = await ws.events(len(match.events))
                await listener.wait_for(len(match.events), distinct=True)
            log = producer_log(gateway, "fixtures")
            assert_no_error_logged(gateway)
    finally:
        broker.stop()
    assert f"{len(match.events)} delivered, 0 failed" in log
    by_mqtt = list({p["id"]: p for p in listener.payloads()}.values())
    for events in (by_ws, by_mqtt):
        assert [e["eventType"] for e in events] == [e.type for e in match.events]
        goals = [
            (e["eventDetails"]["minute"], e["eventDetails"]["details"]["team"])
            for e in events
            if e["eventType"] in SCORING
        ]
        assert goals == GOALS
        assert len({e["eventDetails"]["eventId"] for e in events}) == len(events)


async def test_forged_and_stale_deliveries_are_refused(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """A tampered body, a wrong secret and a 10-minute-old timestamp get 401 and
    publish nothing; the producer with a wrong secret exits non-zero."""
    match = load_match()
    body = orjson.dumps(
        {
            "id": "forged-1",
            "type": "GOAL_SCORED",
            "fixture": match.fixture,
            "minute": 23,
            "details": {"team": "ARG"},
        }
    )
    url_path = "/webhooks/fixtures"
    with running_gateway(tmp_path, webhook_secret=SECRET) as gateway:
        async with ws_client(gateway) as ws:
            await ws.subscribe("fixtures/#", "teams/#")
            url = gateway.http_url + url_path
            tampered = body.replace(b'"minute":23', b'"minute":24')
            cases = [
                (tampered, signed_headers(SECRET.encode(), body)),
                (body, signed_headers(b"not-the-secret-of-this-gateway", body)),
                (body, signed_headers(SECRET.encode(), body, at=time.time() - 600)),
            ]
            for content, headers in cases:
                response = await http.post(url, content=content, headers=headers)
                assert response.status_code == 401, response.text
                assert response.json()["error"]["code"] == "unauthorized"
            await ws.expect_silence(0.5)


async def test_fixtures_producer_stops_at_the_first_refusal(tmp_path: Path) -> None:
    """With a wrong webhook secret the fixtures producer, even with --loop, stops
    at the first 401 and exits 1 with one line naming the secret's setting."""
    with running_gateway(tmp_path, webhook_secret=SECRET) as gateway:
        async with ws_client(gateway) as ws:
            await ws.subscribe("fixtures/#", "teams/#")
            process = produce(
                gateway,
                "fixtures",
                "--speed",
                "600",
                "--loop",
                GATEWAY_WEBHOOK_SECRET="a-wrong-secret-for-this-gateway",
            )
            assert process.wait(timeout(20)) == 1
            await ws.expect_silence(0.5)
        log = producer_log(gateway, "fixtures")
    [error] = [line for line in log.splitlines() if "refused" in line]
    assert error.startswith("Error: delivery "), log
    assert "refused: HTTP 401" in error
    assert error.endswith("check --webhook-secret / GATEWAY_WEBHOOK_SECRET"), error
    assert " ERROR " not in log and "failed for good" not in log, log


class LossyProxy:
    """An HTTP server in front of the gateway that forwards every request but
    answers the first ``lose`` with 503, as if the acknowledgement were lost."""

    def __init__(self, upstream: str, lose: int) -> None:
        self.upstream = upstream
        self.lose = lose
        self.port = free_port()
        # Per forwarded request: its headers, body and the gateway's answer.
        self.seen: list[tuple[dict[str, str], bytes, dict[str, Any]]] = []
        self.client = httpx.AsyncClient(timeout=10)
        app = Starlette(
            routes=[Route("/webhooks/fixtures", self.forward, methods=["POST"])]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, lifespan="off"
        )
        self.server = uvicorn.Server(config)

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        names = ("content-type", "x-webhook-timestamp", "x-webhook-signature")
        headers = {name: request.headers[name] for name in names}
        answer = await self.client.post(
            self.upstream + request.url.path, content=body, headers=headers
        )
        self.seen.append((headers, body, answer.json()))
        if len(self.seen) <= self.lose:
            return Response(status_code=503)
        return JSONResponse(answer.json(), answer.status_code)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LossyProxy]:
        task = asyncio.create_task(self.server.serve())

        async def started() -> bool:
            return bool(self.server.started)

        await wait_until(started, 5, "proxy started")
        try:
            yield self
        finally:
            self.server.should_exit = True
            await task
            await self.client.aclose()


async def test_retried_delivery_is_resigned_and_published_once(
    tmp_path: Path, backend: str
) -> None:
    """When acknowledgements are lost the sender retries with the same id and body,
    a fresh timestamp and signature; the gateway publishes the event once."""
    match = load_match()
    body = orjson.dumps(
        {
            "id": "retried-1",
            "type": "GOAL_SCORED",
            "fixture": match.fixture,
            "minute": 36,
            "details": {"team": "ARG"},
        }
    )
    with running_gateway(tmp_path, webhook_secret=SECRET) as gateway:
        async with (
            ws_client(gateway) as ws,
            LossyProxy(gateway.http_url, lose=2).running() as proxy,
            httpx.AsyncClient() as client,
        ):
            await ws.subscribe("teams/ARG")
            sender = WebhookSender(
                client,
                f"http://127.0.0.1:{proxy.port}/webhooks/fixtures",
                SECRET.encode(),
                retries=3,
                backoff=1.0,
            )
            assert await sender.deliver("retried-1", body) == 2
            [published] = await ws.events(1)
            await ws.expect_silence(1.0)
        assert_no_error_logged(gateway)
    assert published["eventDetails"]["eventId"] == "retried-1"
    assert [seen_body for _, seen_body, _ in proxy.seen] == [body] * 3
    assert [answer["duplicate"] for _, _, answer in proxy.seen] == [False, True, True]
    stamps = [int(headers["x-webhook-timestamp"]) for headers, _, _ in proxy.seen]
    signatures = {headers["x-webhook-signature"] for headers, _, _ in proxy.seen}
    # The delays add up to at least 1.5 s, so the last attempt has a later stamp.
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]
    assert len(signatures) >= 2


async def test_sender_gives_up_after_its_retries() -> None:
    """Connection errors are retried, then the delivery fails for good."""
    async with httpx.AsyncClient() as client:
        sender = WebhookSender(
            client,
            f"http://127.0.0.1:{free_port()}/webhooks/fixtures",
            SECRET.encode(),
            retries=2,
            backoff=0.05,
        )
        with pytest.raises(DeliveryError, match="after 3 attempts"):
            await sender.deliver("gone-1", b"{}")


# The demo.


def start_demo(tmp_path: Path) -> Gateway:
    """Start ``gateway demo`` on a free port, with none of the tests' settings."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    log_path = tmp_path / "demo.log"
    command = ["demo", "--port", str(port), "--mqtt-broker", "none"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Gateway(process, port, log_path)


@pytest.mark.timeout(60)
async def test_demo_shows_both_feeds_within_5_seconds(tmp_path: Path) -> None:
    """``gateway demo`` starts both producers: stock prices and the match's events
    reach a WebSocket subscriber within 5 s of start, and both stop with it."""
    started = time.monotonic()
    gateway = start_demo(tmp_path)
    log_path = gateway.log_path
    try:
        async with httpx.AsyncClient() as http:

            async def ready() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get(f"{gateway.http_url}/readyz")).is_success
                return False

            await wait_until(ready, 5, "demo ready")
        seen: set[str] = set()
        async with ws_client(gateway) as ws:
            # The fixture topic from its first offset, in case the match
            # started before this subscription.
            await ws.subscribe("stocks/#", "fixtures/#", offsets={FIXTURE_TOPIC: 0})
            while seen != {"stocks", "fixtures"}:
                message = await ws.recv(5)
                if message["type"] == "event":
                    seen.add(message["topic"].split("/")[0])
        elapsed = time.monotonic() - started
        assert elapsed < timeout(5), elapsed
    finally:
        assert gateway.stop() == 0
    log = log_path.read_text()
    assert "stock feed done" in log and "fixtures feed done" in log, log
    assert "Traceback" not in log, log
