"""``gateway bench``: polling, WebSocket and MQTT side by side on one event stream.

For each strategy in turn, the benchmark starts a fresh gateway (``gateway serve``
on free loopback ports, in-memory state; for MQTT with a private Mosquitto on a
free port, or the embedded broker when Mosquitto is not installed), connects
``--clients`` clients to one topic, lets them settle for ``--warmup`` seconds,
then publishes ``--rate`` events per second for ``--duration`` seconds over
HTTP, and waits for the last deliveries. With ``--url`` it targets a running
gateway instead (and ``--mqtt-url`` for its broker), whose CPU it cannot see.

The clients are the hand-written ones of the other benchmarks, so that thousands
cost little and every byte is counted where it crosses the socket (HTTP status
lines and headers, WebSocket and MQTT framing included): ``clients._wire`` for
WebSocket, ``clients._mqtt_wire`` subscribing at QoS 1 for MQTT, and keep-alive
HTTP/1.1 pollers with ``If-None-Match`` on fixed clocks spread over the
interval. Latency runs from the moment the producer sent an event (a
``perf_counter`` reading in ``eventDetails.sentAt``) to the moment a client
read it; the producer and the clients share this process's clock.

Bytes and requests are counted from the first event to the last one published,
so that per-event figures are steady-state rates; connection set-up is not in
them. The report (JSON, Markdown, PNG plots) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import psutil
from rich.console import Console
from rich.progress import Progress, TaskID

from clients._cli import (
    MASK,
    check_gateway_url,
    http_address,
    masked_command,
    masked_url,
    stop_on_sigterm,
)
from clients._mqtt_wire import MqttClient, decode_length
from clients._publish import HttpPublisher
from clients._servers import (
    HOST,
    MOSQUITTO,
    Deployment,
    raise_open_files_limit,
    start_deployment,
)
from clients._wire import BenchError, Tally, WebSocketClient
from clients.poll_bench import _etag_of, _exchange

__all__ = ["Options", "StrategyResult", "main", "parse_args"]

STRATEGY_NAMES = ("poll", "ws", "mqtt")
_CONNECT_CONCURRENCY = 50
_START_TIMEOUT = 30.0


@dataclass
class Options:
    """What one ``gateway bench`` run does."""

    clients: int
    rate: float
    duration: float
    poll_interval: float
    strategies: tuple[str, ...]
    out: Path
    warmup: float
    url: str | None
    api_key: str | None
    mqtt_url: str | None
    progress: bool
    command: str


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway bench", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--clients", type=int, default=1000, help="clients per strategy")
    add("--rate", type=float, default=10.0, help="events published per second")
    add("--duration", type=float, default=60.0, help="seconds of publishing")
    add("--poll-interval", type=float, default=1.0, help="seconds between polls")
    add(
        "--strategies",
        default="poll,ws,mqtt",
        help=f"comma list of {', '.join(STRATEGY_NAMES)}, measured in that order",
    )
    add(
        "--out",
        type=Path,
        default=None,
        help="report folder (default: bench-results/bench-<UTC time>)",
    )
    add("--warmup", type=float, default=3.0, help="seconds between connect and publish")
    add("--url", help="a running gateway, http://host[:port] (else one is started)")
    add("--api-key", help="the running gateway's API key; needed with --url")
    add(
        "--mqtt-url",
        help="the running gateway's broker, mqtt://[user:password@]host[:port]; "
        "only with --url, needed there for the mqtt strategy",
    )
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_urls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error when --url, --api-key or --mqtt-url do not fit."""
    if args.mqtt_url and not args.url:
        parser.error(
            "--mqtt-url needs --url: it names the running gateway's broker; "
            "without --url the benchmark starts its own"
        )
    if args.url is None:
        return
    check_gateway_url(parser, args.url, args.api_key)
    if args.mqtt_url:
        problem = _broker_url_problem(args.mqtt_url)
        if problem:
            parser.error(f"--mqtt-url: {problem}")


def _broker_url_problem(url: str) -> str | None:
    """Why the benchmark's MQTT clients cannot use ``url``, or None."""
    from gateway.transports.mqtt import parse_broker_url

    try:
        address = parse_broker_url(url)
    except ValueError as exc:
        return str(exc)
    if address.tls:
        return "mqtts is not supported, the clients speak plain MQTT"
    return None


def _report_secrets(args: argparse.Namespace) -> dict[str, str]:
    """Each secret of the command line to what reports show instead."""
    shown = {}
    if args.api_key:
        shown[args.api_key] = MASK
    for url in (args.url, args.mqtt_url):
        if url and masked_url(url) != url:
            shown[url] = masked_url(url)
    return shown


def parse_args(argv: list[str]) -> Options:
    """The benchmark's options; exit with status 2 on a bad one."""
    parser = _parser()
    args = parser.parse_args(argv)
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    unknown = set(strategies) - set(STRATEGY_NAMES)
    if unknown or not strategies:
        parser.error(f"--strategies: choose from {','.join(STRATEGY_NAMES)}")
    _check_urls(parser, args)
    if args.url and "mqtt" in strategies and not args.mqtt_url:
        parser.error("--url with the mqtt strategy needs --mqtt-url")
    if min(args.clients, args.rate, args.duration, args.poll_interval) <= 0:
        parser.error("--clients, --rate, --duration, --poll-interval: above 0")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    return Options(
        clients=args.clients,
        rate=args.rate,
        duration=args.duration,
        poll_interval=args.poll_interval,
        strategies=strategies,
        out=args.out or Path("bench-results") / f"bench-{stamp}",
        warmup=args.warmup,
        url=args.url,
        api_key=args.api_key,
        mqtt_url=args.mqtt_url,
        progress=not args.no_progress,
        # Only reports read it: the secrets are masked once, here.
        command=masked_command(["gateway", "bench", *argv], _report_secrets(args)),
    )


# Counting what crosses the sockets.


@dataclass
class Wire:
    """Bytes and messages that crossed the sockets of one strategy's clients."""

    sent: int = 0
    received: int = 0
    #: Requests (polling), frames (WebSocket) or packets (MQTT) sent.
    messages_sent: int = 0

    def snapshot(self) -> tuple[int, int, int]:
        """The counters now."""
        return self.sent, self.received, self.messages_sent


class _CountingTransport:
    """A transport that counts what is written through it."""

    def __init__(
        self,
        inner: asyncio.Transport,
        wire: Wire,
        messages_in: Callable[[bytes], int],
    ) -> None:
        self._inner = inner
        self._wire = wire
        self._messages_in = messages_in

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raw = bytes(data)
        self._wire.sent += len(raw)
        self._wire.messages_sent += self._messages_in(raw)
        self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _mqtt_packets(data: bytes) -> int:
    """How many MQTT packets ``data`` holds (every write holds whole ones)."""
    count = pos = 0
    while pos < len(data):
        length, start = decode_length(data, pos)
        if start < 0:
            break
        pos = start + length
        count += 1
    return count


class _CountedWebSocket(WebSocketClient):
    """The benchmark's WebSocket client, counting bytes both ways."""

    def __init__(self, port: int, tally: Tally, wire: Wire) -> None:
        super().__init__(HOST, port, "/ws", tally)
        self.wire = wire

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        counted = _CountingTransport(
            cast(asyncio.Transport, transport), self.wire, lambda _: 1
        )
        super().connection_made(cast(asyncio.Transport, counted))

    def data_received(self, data: bytes) -> None:
        self.wire.received += len(data)
        super().data_received(data)


class _CountedMqtt(MqttClient):
    """The benchmark's MQTT subscriber, counting bytes and packets both ways."""

    def __init__(
        self, tally: Tally, wire: Wire, login: tuple[str | None, str | None]
    ) -> None:
        super().__init__(tally, keepalive=60, username=login[0], password=login[1])
        self.wire = wire

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        counted = _CountingTransport(
            cast(asyncio.Transport, transport), self.wire, _mqtt_packets
        )
        super().connection_made(cast(asyncio.Transport, counted))

    def data_received(self, data: bytes) -> None:
        self.wire.received += len(data)
        super().data_received(data)


# One strategy's clients.


@dataclass
class Fleet:
    """The clients of one strategy and what they count together."""

    strategy: str
    tally: Tally = field(default_factory=Tally)
    wire: Wire = field(default_factory=Wire)
    closers: list[Callable[[], None]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    poll_errors: int = 0

    def close(self) -> None:
        """Drop every connection and stop every poller."""
        for task in self.tasks:
            task.cancel()
        for close in self.closers:
            close()


async def _open_ws(fleet: Fleet, port: int, topic: str) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(_START_TIMEOUT):
        _, client = await loop.create_connection(
            lambda: _CountedWebSocket(port, fleet.tally, fleet.wire), HOST, port
        )
        fleet.closers.append(client.abort)
        await client.opened
        client.send_json({"op": "subscribe", "topics": [topic]})
        while (message := await client.messages.get()).get("type") != "subscribed":
            if message.get("type") == "error":
                raise BenchError(f"subscription refused: {message}")


async def _open_mqtt(
    fleet: Fleet, host: str, port: int, topic: str, login: tuple[str | None, str | None]
) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(_START_TIMEOUT):
        _, client = await loop.create_connection(
            lambda: _CountedMqtt(fleet.tally, fleet.wire, login), host, port
        )
        fleet.closers.append(client.abort)
        await client.opened
        await client.subscribe(topic, qos=1)


async def _poller(
    fleet: Fleet, port: int, topic: str, first: float, interval: float
) -> None:
    """Poll on a fixed clock from ``first`` (a ``perf_counter`` time) on."""
    reader, writer = await asyncio.open_connection(HOST, port)
    fleet.closers.append(writer.close)
    head = b"GET /topics/%b/events?since=%%d HTTP/1.1\r\nHost: %b:%d\r\n" % (
        topic.encode(),
        HOST.encode(),
        port,
    )
    since: int | None = None
    etag: bytes | None = None
    seen: set[int] = set()
    tally, wire = fleet.tally, fleet.wire
    tick = 0
    while True:
        due = first + tick * interval
        tick += 1
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        request = head % (since or 0)
        if etag is not None:
            request += b"If-None-Match: %b\r\n" % etag
        request += b"\r\n"
        wire.sent += len(request)
        wire.messages_sent += 1
        status, response_head, body, received = await _exchange(reader, writer, request)
        now = time.perf_counter()
        wire.received += received
        etag = _etag_of(response_head)
        if status == 304:
            continue
        if status != 200:
            fleet.poll_errors += 1
            continue
        answer = orjson.loads(body)
        if since is None:
            # The first answer only says where the topic is: start after it.
            since = answer["lastOffset"]
            etag = None
            continue
        since = answer["nextOffset"]
        for event in answer["events"]:
            details = event["eventDetails"]
            tally.received += 1
            tally.last_at = now
            tally.latencies.append(now - details["sentAt"])
            if details["seq"] in seen:
                tally.duplicates += 1
            seen.add(details["seq"])


# Where things run.


@dataclass
class Target:
    """The gateway (and broker) one strategy runs against."""

    http_host: str
    http_port: int
    api_key: str
    mqtt_host: str | None = None
    mqtt_port: int | None = None
    #: User name and password of a broker given by URL; anonymous when None.
    mqtt_login: tuple[str | None, str | None] = (None, None)
    deployment: Deployment | None = None
    broker_name: str | None = None

    def stop(self) -> None:
        """Stop what the benchmark started."""
        if self.deployment is not None:
            self.deployment.stop()


def _mosquitto_version() -> str | None:
    """The installed Mosquitto's version line, or None when it is not there."""
    if not os.access(MOSQUITTO, os.X_OK):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            [MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5
        )
        for line in (result.stdout + result.stderr).splitlines():
            if "version" in line:
                return line.strip()
    return "mosquitto"


async def _start_target(options: Options, strategy: str, log_dir: Path) -> Target:
    if options.url is not None:
        host, port = http_address(options.url)
        target = Target(host, port, options.api_key or "")
        if strategy == "mqtt" and options.mqtt_url:
            from gateway.transports.mqtt import parse_broker_url

            broker = parse_broker_url(options.mqtt_url)
            target.mqtt_host, target.mqtt_port = broker.host, broker.port
            target.mqtt_login = (broker.username, broker.password)
            target.broker_name = f"given by URL ({broker.host}:{broker.port})"
        return target
    kind = "gateway"
    broker_name = None
    if strategy == "mqtt":
        version = _mosquitto_version()
        kind = "gateway-mqtt" if version else "gateway-embedded-mqtt"
        broker_name = (
            f"private Mosquitto ({version})"
            if version
            else "embedded amqtt broker (Mosquitto not installed)"
        )
    deployment = start_deployment(
        kind,
        log_dir,
        max_buffer_bytes=16 * 1024 * 1024,
        redis_url="redis://127.0.0.1:6379/0",
        # What Retry-After says; the gateway takes whole seconds, and the
        # benchmark's pollers keep their own clock anyway.
        extra_settings={
            "GATEWAY_POLL_INTERVAL": str(max(1, round(options.poll_interval)))
        },
    )
    try:
        await deployment.wait_ready(_START_TIMEOUT)
    except BaseException:
        deployment.stop()
        raise
    target = Target(HOST, deployment.publish_port, deployment.api_key)
    target.deployment = deployment
    target.broker_name = broker_name
    if deployment.mqtt is not None:
        target.mqtt_host = deployment.mqtt.host
        target.mqtt_port = deployment.mqtt.port
    return target


# The run.


@dataclass
class StrategyResult:
    """Everything measured for one strategy."""

    strategy: str
    figures: dict[str, Any]
    latencies_ms: list[float]
    load: list[dict[str, float]]


class _LoadSampler:
    """Samples the gateway's and broker's CPU and memory once a second."""

    def __init__(self, deployment: Deployment | None) -> None:
        self.deployment = deployment
        self.samples: list[dict[str, float]] = []
        self._task: asyncio.Task[None] | None = None

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per role (gateway, broker)."""
        if self.deployment is None:
            return {}
        return {k: u + s for k, (u, s) in self.deployment.cpu_by_role().items()}

    def rss(self) -> dict[str, float]:
        """Resident memory now per role, in MB."""
        if self.deployment is None:
            return {}
        out: dict[str, float] = {}
        for process in self.deployment.processes:
            # A process that ended meanwhile has nothing left to count.
            with contextlib.suppress(psutil.Error):
                out[process.role] = out.get(process.role, 0.0) + process.rss_bytes(
                    children=process.children_role is not None
                ) / (1024 * 1024)
        return out

    def start(self) -> None:
        """Begin sampling."""
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        start = time.perf_counter()
        before = self.cpu()
        last = start
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            cpu = self.cpu()
            sample = {"t": now - start}
            for role, seconds in cpu.items():
                sample[f"{role}_cpu_pct"] = (
                    100 * (seconds - before.get(role, 0.0)) / (now - last)
                )
            for role, megabytes in self.rss().items():
                sample[f"{role}_rss_mb"] = megabytes
            self.samples.append(sample)
            before, last = cpu, now

    def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()


def _event_body(topic: str, seq: int) -> bytes:
    details = {
        "sentAt": time.perf_counter(),
        "seq": seq,
        "symbol": "AAPL",
        "price": round(180 + (seq % 100) / 10, 2),
    }
    return orjson.dumps(
        {
            "topic": topic,
            "eventSource": "bench",
            "eventType": "PRICE_CHANGED",
            "eventDetails": details,
        }
    )


async def _connect(
    fleet: Fleet, target: Target, topic: str, options: Options, bar: _Bar
) -> None:
    n = options.clients
    task = bar.add(f"{fleet.strategy}: connect {n:,} clients", n)
    if fleet.strategy == "poll":
        first = time.perf_counter() + 0.5
        spread = options.poll_interval / n
        for index in range(n):
            fleet.tasks.append(
                asyncio.create_task(
                    _poller(
                        fleet,
                        target.http_port,
                        topic,
                        first + index * spread,
                        options.poll_interval,
                    )
                )
            )
        # The first round of polls tells each poller where the topic is.
        await asyncio.sleep(0.5 + options.poll_interval)
        bar.advance(task, n)
        return
    limit = asyncio.Semaphore(_CONNECT_CONCURRENCY)

    async def one() -> None:
        async with limit:
            if fleet.strategy == "ws":
                await _open_ws(fleet, target.http_port, topic)
            else:
                assert target.mqtt_host is not None and target.mqtt_port is not None
                await _open_mqtt(
                    fleet, target.mqtt_host, target.mqtt_port, topic, target.mqtt_login
                )
            bar.advance(task, 1)

    await asyncio.gather(*(one() for _ in range(n)))


async def _publish(
    publisher: HttpPublisher, topic: str, options: Options, bar: _Bar, label: str
) -> tuple[int, float]:
    """Publish on a fixed clock; return the count and the seconds it took."""
    total = round(options.rate * options.duration)
    task = bar.add(f"{label}: publish {total:,} events", total)
    start = time.perf_counter()
    for seq in range(total):
        # A fixed clock: a slow answer delays one event, not the ones after it.
        await asyncio.sleep(max(0.0, start + seq / options.rate - time.perf_counter()))
        await publisher.publish(_event_body(topic, seq))
        bar.advance(task, 1)
    return total, time.perf_counter() - start


async def _drain(fleet: Fleet, expected: int, within: float, bar: _Bar) -> None:
    task = bar.add(f"{fleet.strategy}: wait for the last deliveries", expected)
    deadline = time.perf_counter() + within
    done = 0
    while time.perf_counter() < deadline:
        unique = fleet.tally.unique
        bar.advance(task, unique - done)
        done = unique
        if unique >= expected:
            return
        await asyncio.sleep(0.2)


async def run_strategy(
    options: Options, strategy: str, topic: str, bar: _Bar
) -> StrategyResult:
    """Start the target, connect the clients, publish, measure, stop."""
    target = await _start_target(options, strategy, options.out / "logs")
    fleet = Fleet(strategy)
    sampler = _LoadSampler(target.deployment)
    publisher = await HttpPublisher.open(
        target.http_host, target.http_port, target.api_key, request_timeout=30
    )
    try:
        await _connect(fleet, target, topic, options, bar)
        await asyncio.sleep(options.warmup)
        fleet.tally.reset()
        sampler.start()
        wire_before = fleet.wire.snapshot()
        cpu_before = sampler.cpu()
        published, seconds = await _publish(publisher, topic, options, bar, strategy)
        wire_after = fleet.wire.snapshot()
        cpu_after = sampler.cpu()
        rss = sampler.rss()
        expected = published * options.clients
        await _drain(fleet, expected, options.poll_interval + 10, bar)
    finally:
        sampler.stop()
        publisher.close()
        fleet.close()
        target.stop()
    figures = _figures(
        options, fleet, published, seconds, wire_before, wire_after, expected
    )
    for role in cpu_after:
        share = (cpu_after[role] - cpu_before.get(role, 0.0)) / seconds
        figures[f"{role}_cpu_pct"] = round(100 * share, 1)
        figures[f"{role}_rss_mb"] = round(rss.get(role, 0.0), 1)
    figures["broker"] = target.broker_name
    latencies = [1000 * x for x in fleet.tally.latencies]
    return StrategyResult(strategy, figures, latencies, sampler.samples)


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(share * len(values)))]


def _figures(
    options: Options,
    fleet: Fleet,
    published: int,
    seconds: float,
    before: tuple[int, int, int],
    after: tuple[int, int, int],
    expected: int,
) -> dict[str, Any]:
    tally = fleet.tally
    latencies = sorted(1000 * x for x in tally.latencies)
    per_event = max(1, published * options.clients)
    sent, received, messages = (a - b for a, b in zip(after, before, strict=True))

    def ms(share: float) -> float | None:
        value = _percentile(latencies, share)
        return None if value is None else round(value, 1)

    return {
        "clients": options.clients,
        "events_published": published,
        "publish_seconds": round(seconds, 2),
        "deliveries_expected": expected,
        "deliveries_unique": tally.unique,
        "lost": max(0, expected - tally.unique),
        "duplicates": tally.duplicates,
        "closed_by_server": sum(tally.closes.values()),
        "poll_errors": fleet.poll_errors,
        "latency_ms": {
            "p50": ms(0.5),
            "p90": ms(0.9),
            "p99": ms(0.99),
            "max": round(latencies[-1], 1) if latencies else None,
        },
        "bytes_per_client_per_event": {
            "sent": round(sent / per_event, 1),
            "received": round(received / per_event, 1),
        },
        "bytes_per_client_per_second": {
            "sent": round(sent / options.clients / seconds, 1),
            "received": round(received / options.clients / seconds, 1),
        },
        "client_messages_per_second": round(messages / seconds, 1),
        "deliveries_per_second": round(tally.unique / seconds, 1),
    }


class _Bar:
    """Progress bars on standard error, or nothing."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def add(self, label: str, total: int) -> TaskID | None:
        if self.progress is None:
            return None
        return self.progress.add_task(label, total=total)

    def advance(self, task: TaskID | None, amount: int) -> None:
        if self.progress is not None and task is not None and amount:
            self.progress.advance(task, amount)


@contextlib.contextmanager
def _bars(enabled: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None)
        return
    with Progress(console=Console(stderr=True)) as progress:
        yield _Bar(progress)


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def _run_all(options: Options, bar: _Bar) -> list[StrategyResult]:
    topic = f"fixtures/bench/{secrets.token_hex(4)}"
    results = []
    for strategy in options.strategies:
        results.append(await run_strategy(options, strategy, topic, bar))
    return results


def main(argv: list[str]) -> int:
    """Run the benchmark, write the report, print its summary; return the status."""
    from clients._bench_report import write_report

    stop_on_sigterm()
    options = parse_args(argv)
    limit = raise_open_files_limit()
    if limit < options.clients + 512:
        print(f"gateway bench: open-files limit {limit} is too low", file=sys.stderr)
        return 2
    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gateway bench: --out {options.out}: {exc.strerror}", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    load_before = _load_average()
    try:
        with _bars(options.progress) as bar:
            results = asyncio.run(_run_all(options, bar))
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 1
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": socket.gethostname(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "command": options.command,
        "gateway": masked_url(options.url)
        if options.url
        else "started by the benchmark (in-memory state)",
    }
    summary = write_report(options, meta, results)
    print(summary)
    print(f"\nreport: {options.out}")
    return 0
