"""The browser page at ``/``, driven in real headless Chromium (Debian's package).

The page follows the same topics by HTTP polling, WebSocket and MQTT over WebSocket.
These tests start real gateways, open the page in Chromium through Playwright (which
uses the system browser and downloads none) and read what each column shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright
from support import (
    API_KEY,
    Gateway,
    assert_no_error_logged,
    free_port,
    publish,
    running_gateway,
    timeout,
)

from gateway.config import load_settings
from gateway.ingress import page as page_module

CHROMIUM = "/usr/bin/chromium"
#: Flags that keep Chromium from calling home on a machine with a closed network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The README shows this screenshot; a run of the end-to-end test refreshes it when
#: GATEWAY_TEST_README_SCREENSHOT=1, so that CI leaves the work tree as it was.
README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "page.png"
STRATEGIES = ("poll", "ws", "mqtt")
SYMBOLS = ("PGAA", "PGBB")
MATCH_TOPIC = "teams/PGT"

pytestmark = pytest.mark.timeout(timeout(120))


# Gateways and the browser.


@contextlib.contextmanager
def running_demo(tmp_path: Path) -> Iterator[Gateway]:
    """``gateway demo`` with its embedded broker on free ports, until the block ends.

    The machine's Mosquitto holds 1883, so the broker's two ports are chosen here.
    """
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_API_KEY": API_KEY,
            "GATEWAY_MQTT_PORT": str(free_port()),
            "GATEWAY_MQTT_WS_PORT": str(free_port()),
            "GATEWAY_LOG_LEVEL": "info",
        }
    )
    for name in ("GATEWAY_MQTT_BROKER", "GATEWAY_MQTT_URL", "GATEWAY_REDIS_URL"):
        env.pop(name, None)
    log_path = tmp_path / f"demo-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    gateway = Gateway(process, port, log_path)
    try:
        _wait_ready(gateway)
        yield gateway
    finally:
        gateway.stop()


def _wait_ready(gateway: Gateway) -> None:
    """Wait until the gateway is ready and connected to its embedded broker."""
    deadline = time.monotonic() + timeout(30)
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{gateway.log()}")
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(f"{gateway.http_url}/readyz", timeout=1)
            if answer.status_code == 200 and answer.json()["mqtt"]["connected"]:
                return
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready in time:\n{gateway.log()}")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, through Playwright."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, gateway: Gateway, width: int = 1440) -> Page:
    """The gateway's page, loaded and past its start (it marks ``body[data-ready]``)."""
    context = await browser.new_context(viewport={"width": width, "height": 1000})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"{gateway.http_url}/")
    await page.wait_for_selector("body[data-ready=true]", timeout=timeout(10) * 1000)
    assert not errors, errors
    return page


# Reading the page.

_COLUMNS_JS = """
() => Object.fromEntries([...document.querySelectorAll('.column')].map((c) => [
  c.dataset.strategy,
  {
    connection: c.querySelector('.connection').textContent,
    connectionState: c.querySelector('.connection').dataset.state,
    unavailable: c.querySelector('.unavailable-note')?.textContent ?? null,
    metrics: Object.fromEntries([...c.querySelectorAll('[data-metric]')].map(
      (d) => [d.dataset.metric, d.textContent])),
    prices: Object.fromEntries([...c.querySelectorAll('.ticker tbody tr')].map(
      (r) => [r.dataset.symbol, r.children[1].textContent])),
    feed: [...c.querySelectorAll('.feed li')].map((li) => li.textContent),
    progress: Number(c.querySelector('.job progress').dataset.progress),
    jobState: c.querySelector('.job-text').dataset.state ?? null,
  },
]))
"""


async def columns(page: Page) -> dict[str, dict[str, Any]]:
    """What each column shows now, keyed by strategy."""
    shown: dict[str, dict[str, Any]] = await page.evaluate(_COLUMNS_JS)
    return shown


def _count(text: str) -> int:
    return int(text.split()[0].replace(",", ""))


def _lacking(column: dict[str, Any]) -> list[str]:
    """What a column does not show yet, of what a working column must show."""
    metrics = column["metrics"]
    lacking = []
    if _count(metrics["events"]) < 10:
        lacking.append("10 events")
    if metrics["median"] == "–" or metrics["delay"] == "–":
        lacking.append("delays")
    if _count(metrics["units"]) == 0:
        lacking.append("requests or frames")
    if metrics["bytes"].startswith("0 "):
        lacking.append("bytes")
    if any(column["prices"].get(symbol, "–") == "–" for symbol in SYMBOLS):
        lacking.append("a price for every symbol")
    if not column["feed"]:
        lacking.append("match events")
    return lacking


async def wait_for_columns(
    page: Page, check: Any, what: str, seconds: float
) -> dict[str, dict[str, Any]]:
    """Wait until ``check(column)`` holds for every column; fail saying which not."""
    deadline = time.monotonic() + timeout(seconds)
    while True:
        shown = await columns(page)
        failing = {name: col for name, col in shown.items() if not check(col)}
        if not failing and set(shown) == set(STRATEGIES):
            return shown
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout(seconds)} s: {what}: {failing}")
        await asyncio.sleep(0.2)


# A publisher standing in for the producers.


async def feed_events(gateway: Gateway, stop: asyncio.Event) -> None:
    """Publish prices for ``SYMBOLS`` every 0.25 s and a match event every second.

    The page's topics are this test's own, so whatever else the demo publishes
    (its producers, when they run) does not change what the columns must show.
    """
    async with httpx.AsyncClient() as client:
        for number in itertools.count():
            items = [
                {
                    "topic": f"stocks/{symbol}",
                    "eventSource": "test-page",
                    "eventType": "PRICE_CHANGED",
                    "eventDetails": {"price": 100 + index + (number % 7) / 4},
                }
                for index, symbol in enumerate(SYMBOLS)
            ]
            if number % 4 == 0:
                items.append(
                    {
                        "topic": MATCH_TOPIC,
                        "eventSource": "test-page",
                        "eventType": "GOAL_SCORED",
                        "eventDetails": {"minute": number // 4, "team": "PGT"},
                    }
                )
            response = await publish(client, gateway, items)
            assert response.status_code == 200, response.text
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
            if stop.is_set():
                return


# The tests.


async def test_three_columns_show_feeds_and_follow_a_job(tmp_path: Path) -> None:
    """Under gateway demo, all three columns show events and a job reaching 100 %."""
    with running_demo(tmp_path) as gateway:
        stop = asyncio.Event()
        publisher = asyncio.create_task(feed_events(gateway, stop))
        try:
            async with chromium() as browser:
                page = await open_page(browser, gateway)

                # Topic choice, through the labelled form, applies to all columns.
                await page.get_by_label("Stock symbols").fill(", ".join(SYMBOLS))
                await page.get_by_label("Match events").fill(MATCH_TOPIC)
                await page.get_by_role("button", name="Apply to all columns").click()
                shown = await wait_for_columns(
                    page,
                    lambda column: not _lacking(column),
                    "events, delays, costs, prices and match events in each column",
                    30,
                )
                for name, column in shown.items():
                    assert column["connectionState"] == "open", (name, column)

                # One job, started by the page's button, followed three ways.
                await page.get_by_label("Length in seconds").fill("4")
                await page.get_by_role("button", name="Start a job").click()
                await wait_for_columns(
                    page,
                    lambda column: (
                        column["progress"] == 100 and column["jobState"] == "succeeded"
                    ),
                    "the job at 100 %, succeeded, in each column",
                    30,
                )
                job_id = await page.evaluate("document.body.dataset.jobId")
                async with httpx.AsyncClient() as client:
                    answer = await client.get(f"{gateway.http_url}/jobs/{job_id}")
                status = answer.json()
                assert status["state"] == "succeeded", status

                await page.screenshot(path=tmp_path / "page-laptop.png", full_page=True)
                if os.environ.get("GATEWAY_TEST_README_SCREENSHOT") == "1":
                    shutil.copyfile(tmp_path / "page-laptop.png", README_SCREENSHOT)

                # At a phone's width the columns stack, one under the other.
                await page.set_viewport_size({"width": 390, "height": 844})
                boxes = [
                    await page.locator(f"#column-{name}").bounding_box()
                    for name in STRATEGIES
                ]
                assert all(box is not None for box in boxes)
                lefts = {round(box["x"]) for box in boxes if box is not None}
                assert len(lefts) == 1, boxes
                assert all(box["width"] <= 390 for box in boxes if box is not None)
                await page.screenshot(path=tmp_path / "page-phone.png", full_page=True)
        finally:
            stop.set()
            await publisher
    assert_no_error_logged(gateway)


async def test_serve_without_mqtt_keeps_two_columns_and_asks_for_the_key(
    tmp_path: Path,
) -> None:
    """Under gateway serve with MQTT off: MQTT marked unavailable, jobs need the key."""
    with running_gateway(tmp_path) as gateway:
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{gateway.http_url}/demo/jobs", headers={"X-Gateway-Page": "1"}
            )
        assert answer.status_code == 404, answer.text
        stop = asyncio.Event()
        publisher = asyncio.create_task(feed_events(gateway, stop))
        try:
            async with chromium() as browser:
                page = await open_page(browser, gateway, width=900)
                await page.get_by_label("Stock symbols").fill(", ".join(SYMBOLS))
                await page.get_by_label("Match events").fill(MATCH_TOPIC)
                await page.get_by_role("button", name="Apply to all columns").click()
                shown = await columns(page)
                assert shown["mqtt"]["connectionState"] == "unavailable", shown
                assert "MQTT is off" in shown["mqtt"]["unavailable"], shown

                async def pushed(name: str) -> bool:
                    return _count((await columns(page))[name]["metrics"]["events"]) > 3

                deadline = time.monotonic() + timeout(20)
                while not (await pushed("poll") and await pushed("ws")):
                    assert time.monotonic() < deadline, await columns(page)
                    await asyncio.sleep(0.2)

                # The key field shows, and a job started with the key is followed.
                key_field = page.get_by_label("API key")
                await key_field.wait_for(state="visible")
                await key_field.fill(API_KEY)
                await page.get_by_label("Length in seconds").fill("2")
                await page.get_by_role("button", name="Start a job").click()

                async def done(name: str) -> bool:
                    return bool((await columns(page))[name]["progress"] == 100)

                deadline = time.monotonic() + timeout(20)
                while not (await done("poll") and await done("ws")):
                    assert time.monotonic() < deadline, await columns(page)
                    await asyncio.sleep(0.2)
                await page.screenshot(path=tmp_path / "page-no-mqtt.png")
        finally:
            stop.set()
            await publisher
    assert_no_error_logged(gateway)


async def test_demo_jobs_refuse_what_the_page_would_not_send(tmp_path: Path) -> None:
    """POST /demo/jobs wants the page's header and a bounded length, and no key."""
    with running_gateway(tmp_path, demo_page_jobs="true") as gateway:
        async with httpx.AsyncClient(base_url=gateway.http_url) as client:
            header = {"X-Gateway-Page": "1"}
            answer = await client.post("/demo/jobs", json={"seconds": 2})
            assert answer.status_code == 400, answer.text
            answer = await client.post(
                "/demo/jobs", json={"seconds": 100_000}, headers=header
            )
            assert answer.status_code == 400, answer.text
            assert "seconds" in answer.json()["error"]["message"]
            answer = await client.post(
                "/demo/jobs", json={"seconds": 2}, headers=header
            )
            assert answer.status_code == 202, answer.text
            assert answer.json()["topic"] == f"jobs/{answer.json()['id']}"
            config = (await client.get("/page/config.json")).json()
            assert config["jobs"] == {
                "demo": True,
                "path": "/demo/jobs",
                "maxSeconds": 300.0,
            }
            assert config["mqtt"]["url"] is None


def test_config_names_the_missing_mqtt_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the npm bundle absent, the page is told why its MQTT column is off."""
    settings = load_settings(mqtt_public_ws_url="ws://{host}:9001/mqtt")
    shown = page_module.page_config(settings, "example.test")
    assert page_module.MQTT_BUNDLE.is_file(), "run deploy/dev/install.sh first"
    assert shown["mqtt"] == {
        "url": "ws://example.test:9001/mqtt",
        "prefix": "",
        "script": "/vendor/mqtt.min.js",
        "unavailable": None,
    }
    monkeypatch.setattr(page_module, "MQTT_BUNDLE", Path("/nonexistent/mqtt.min.js"))
    shown = page_module.page_config(settings, "example.test")
    mqtt = shown["mqtt"]
    assert isinstance(mqtt, dict) and mqtt["url"] is None, mqtt
    assert "npm ci in gateway/web" in mqtt["unavailable"], mqtt
