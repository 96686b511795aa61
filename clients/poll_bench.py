"""``gateway poll-bench``: the cost of HTTP polling, measured on the wire.

N clients poll ``GET /topics/{topic}/events?since=OFFSET`` every ``--interval``
seconds (each on its own fixed clock, the clients spread evenly over one interval),
over HTTP/1.1 keep-alive connections, sending ``If-None-Match`` with the last ETag
as a well-behaved poller does. Meanwhile one publisher posts ``--rate`` events per
second to the topic. After ``--warmup`` seconds the benchmark counts, for
``--duration`` seconds: requests answered (200 and 304), bytes each way including
status lines and headers (what the sockets carried, not an estimate), and for every
event a client receives, the delay from the gateway's publish time (``publishedAt``)
to the moment the client read it.

Each client is a hand-written HTTP/1.1 exchange on an asyncio stream, so the client
costs little and counts exactly what crosses the socket. Unless ``--url`` names a
running gateway, each run starts a fresh ``gateway serve`` (in-memory state, no
MQTT) on a free loopback port, and reports its CPU time from psutil.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

import httpx
import orjson
import psutil
import uvloop

from clients._cli import check_gateway_url, http_address, stop_on_sigterm

__all__ = ["main"]

HOST = "127.0.0.1"


@dataclass
class Tally:
    """What the clients counted during the measured window."""

    requests: int = 0
    not_modified: int = 0
    errors: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    delays: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    """One run's figures."""

    requests_per_second: float
    not_modified_share: float
    sent_per_client_per_second: float
    received_per_client_per_second: float
    median_delay_ms: float
    p99_delay_ms: float
    events_published: int
    server_cpu_share: float | None
    errors: int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway poll-bench", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--clients", type=int, default=1000, help="polling clients")
    add("--interval", type=float, default=1.0, help="seconds between polls")
    add("--rate", type=float, default=10.0, help="events published per second")
    add("--warmup", type=float, default=3.0, help="seconds before counting")
    add("--duration", type=float, default=15.0, help="seconds counted")
    add("--runs", type=int, default=3, help="runs; the report gives medians")
    add("--url", help="a running gateway, http://host[:port] (else one is started)")
    add("--api-key", help="the running gateway's API key; needed with --url")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options; exit with status 2 on a bad one."""
    parser = _parser()
    options = parser.parse_args(argv)
    for name in ("clients", "runs"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("interval", "rate", "duration"):
        if getattr(options, name) <= 0:
            parser.error(f"--{name} must be positive")
    if options.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if options.url is not None:
        check_gateway_url(parser, options.url, options.api_key)
        # Paths are appended to it.
        options.url = options.url.rstrip("/")
    return options


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _start_gateway(api_key: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = dict(os.environ)
    for name in [n for n in env if n.startswith("GATEWAY_")]:
        del env[name]
    env.update(
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_API_KEY": api_key,
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_MQTT_BROKER": "none",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{port}"
    try:
        _wait_ready(url, within=15.0)
    except BaseException:
        # Interrupted or never ready: the gateway must not outlive the benchmark.
        process.kill()
        process.wait()
        raise
    return process, url


def _wait_ready(url: str, *, within: float) -> None:
    """Return once ``url`` answers ``/readyz`` with 200, within seconds.

    Raises:
        RuntimeError: it did not in time.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the gateway did not become ready")


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bytes, int]:
    """Send one request; return status, headers, body and bytes received."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return status, head, body, len(head) + length


def _etag_of(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"etag":
            return value.strip()
    return None


async def _client(
    url: str, topic: str, start: float, interval: float, window: tuple[float, float]
) -> Tally:
    """Poll on a fixed clock until the window ends; count what lies inside it."""
    tally = Tally()
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(*http_address(url))
    since = 0
    etag: bytes | None = None
    tick = 0
    try:
        while True:
            due = start + tick * interval
            tick += 1
            if due > window[1]:
                return tally
            await asyncio.sleep(max(0.0, due - time.time()))
            request = b"GET /topics/%b/events?since=%d HTTP/1.1\r\nHost: %b\r\n" % (
                topic.encode(),
                since,
                parts.netloc.encode(),
            )
            if etag is not None:
                request += b"If-None-Match: %b\r\n" % etag
            request += b"\r\n"
            status, head, body, received = await _exchange(reader, writer, request)
            now = time.time()
            counted = window[0] <= now <= window[1]
            if counted:
                tally.requests += 1
                tally.bytes_sent += len(request)
                tally.bytes_received += received
            etag = _etag_of(head)
            if status == 304:
                tally.not_modified += counted
                continue
            if status != 200:
                tally.errors += 1
                continue
            answer = orjson.loads(body)
            since = answer["nextOffset"]
            if counted:
                for event in answer["events"]:
                    published = datetime.fromisoformat(event["publishedAt"])
                    tally.delays.append(now - published.timestamp())
    finally:
        writer.close()


async def _publisher(url: str, key: str, topic: str, rate: float, end: float) -> int:
    """Publish on a fixed clock until ``end``; return how many were published."""
    count = 0
    start = time.time()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=10) as http:
        while (due := start + count / rate) < end:
            await asyncio.sleep(max(0.0, due - time.time()))
            response = await http.post(
                f"{url}/events",
                headers=headers,
                json={
                    "topic": topic,
                    "eventSource": "poll-bench",
                    "eventType": "PRICE_CHANGED",
                    "eventDetails": {"seq": count, "price": 100.0 + count % 50},
                },
            )
            response.raise_for_status()
            count += 1
    return count


async def _run(options: argparse.Namespace, url: str, key: str) -> Tally:
    topic = f"bench/poll/{secrets.token_hex(4)}"
    start = time.time() + 1.0
    window = (start + options.warmup, start + options.warmup + options.duration)
    spread = options.interval / options.clients
    publisher = asyncio.create_task(
        _publisher(url, key, topic, options.rate, window[1])
    )
    tallies = await asyncio.gather(
        *(
            _client(url, topic, start + n * spread, options.interval, window)
            for n in range(options.clients)
        )
    )
    await publisher
    total = Tally()
    for tally in tallies:
        total.requests += tally.requests
        total.not_modified += tally.not_modified
        total.errors += tally.errors
        total.bytes_sent += tally.bytes_sent
        total.bytes_received += tally.bytes_received
        total.delays += tally.delays
    return total


def _one_run(options: argparse.Namespace) -> RunResult:
    process = None
    key = options.api_key or secrets.token_urlsafe(16)
    url = options.url
    if url is None:
        process, url = _start_gateway(key)
    try:
        watched = psutil.Process(process.pid) if process is not None else None
        cpu_before = sum(watched.cpu_times()[:2]) if watched else 0.0
        tally = uvloop.run(_run(options, url, key))
        cpu = sum(watched.cpu_times()[:2]) - cpu_before if watched else None
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    seconds = options.duration
    delays = sorted(tally.delays) or [float("nan")]
    per_client = seconds * options.clients
    return RunResult(
        requests_per_second=tally.requests / seconds,
        not_modified_share=tally.not_modified / max(1, tally.requests),
        sent_per_client_per_second=tally.bytes_sent / per_client,
        received_per_client_per_second=tally.bytes_received / per_client,
        median_delay_ms=1000 * statistics.median(delays),
        p99_delay_ms=1000 * delays[min(len(delays) - 1, int(0.99 * len(delays)))],
        events_published=round(options.rate * seconds),
        server_cpu_share=None if cpu is None else cpu / (seconds + options.warmup + 1),
        errors=tally.errors,
    )


def _report(options: argparse.Namespace, runs: list[RunResult]) -> str:
    def median(name: str) -> float:
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        return statistics.median(values) if values else float("nan")

    lines = [
        f"poll-bench: {options.clients} clients polling every {options.interval:g} s, "
        f"{options.rate:g} events/s, {options.duration:g} s measured after "
        f"{options.warmup:g} s; median of {len(runs)} runs",
        f"  requests/s                     {median('requests_per_second'):,.0f}",
        f"  answered 304                   {100 * median('not_modified_share'):.1f} %",
        f"  bytes/client/s sent            {median('sent_per_client_per_second'):,.0f}",
        "  bytes/client/s received        "
        f"{median('received_per_client_per_second'):,.0f}",
        f"  delay since publish, median    {median('median_delay_ms'):,.0f} ms",
        f"  delay since publish, p99       {median('p99_delay_ms'):,.0f} ms",
        f"  server CPU (share of one core) {100 * median('server_cpu_share'):.0f} %",
        f"  errors                         {sum(r.errors for r in runs)}",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run the benchmark; print the report; return the exit status."""
    stop_on_sigterm()
    options = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < options.clients + 256:
        print(f"poll-bench: open-files limit {hard} is too low", file=sys.stderr)
        return 2
    runs = []
    for number in range(options.runs):
        try:
            runs.append(_one_run(options))
        except (OSError, RuntimeError, httpx.HTTPError) as exc:
            print(f"poll-bench: run {number + 1} failed: {exc}", file=sys.stderr)
            return 1
    print(_report(options, runs))
    return 0
