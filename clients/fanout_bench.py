"""``gateway fanout-bench``: fan-out to many subscribers, the gateway vs a baseline.

For every run and every server configuration (the gateway in memory, on Redis with
one or two replicas, publishing to an MQTT broker whose subscribers are measured
instead, and the raw ``websockets.broadcast`` server of ``clients.baseline_server``;
see ``clients._servers``), the benchmark starts the configuration as fresh
subprocesses on free loopback ports and, with the same load generator:

1. measures its resident memory, connects N subscribers to one topic in batches,
   spread evenly over its replicas, waits a moment and measures it again (the idle
   phase: memory per connection);
2. publishes M events at a steady rate on a fixed clock, whether or not the
   previous ones were answered yet (the steady phase);
3. publishes M events as fast as the server takes them, from a few publishing
   connections with one event in flight each (the burst phase);

then stops it and deletes the run's keys from Redis. Events are published to the
first replica. Each event carries the publisher's clock reading in
``eventDetails.sentAt``, so latency is measured from the moment it was sent to the
moment a subscriber read it, identically for every server; and its number in
``eventDetails.seq``, so a subscriber that reads one twice counts a duplicate.
Server CPU (user plus system) and memory come from psutil, summed over the
configuration's processes. The runs of the configurations are interleaved, so that
a noisy neighbour hurts all alike, and the report shows the median of the runs.

The load generator is one process on uvloop; every subscriber is a hand-written
protocol (``clients._wire`` for WebSocket, ``clients._mqtt_wire`` for MQTT 3.1.1)
that costs the same whichever server it talks to. MQTT subscribers read the same
envelope bytes as WebSocket ones and count them in the same tally; events are
published over HTTP to the gateway in every gateway configuration, so MQTT
latency covers the gateway, its bridge and the broker.
Everything stays on loopback and every wait is bounded; ``--timeout`` bounds the
whole benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import uvloop

from clients._cli import stop_on_sigterm
from clients._metrics import Readings, bridge_counters, phase_metrics
from clients._mqtt_wire import MqttClient, open_mqtt_client
from clients._publish import HttpPublisher, Publisher, WebSocketPublisher
from clients._redis import DEFAULT_REDIS_URL, check_redis
from clients._report import Results, render_report, write_json
from clients._servers import (
    HOST,
    MOSQUITTO,
    SERVER_KINDS,
    BrokerOptions,
    Deployment,
    raise_open_files_limit,
    start_deployment,
    uses_mqtt,
    uses_redis,
)
from clients._wire import BenchError, Tally, WebSocketClient, open_client

__all__ = ["Options", "main"]

MODES = ("idle", "steady", "burst")
#: Seconds a server may take to listen after it was started.
_START_TIMEOUT = 30.0
#: Seconds one subscriber may take from TCP connect to ``subscribed``.
_HANDSHAKE_TIMEOUT = 30.0
#: Seconds one publish may wait for the server's answer.
_PUBLISH_TIMEOUT = 60.0
#: Seconds given to a server to settle after connections come or go.
_SETTLE = 1.0
#: Seconds after its time at which a steady event counts as behind schedule.
_LATE = 0.010
#: The warm-up event's topic: QoS 1 under the gateway's default MQTT rules, so
#: that the bridge keeps it until it has connected to the broker, and in a tree
#: every MQTT subscriber may read.
WARMUP_TOPIC = "fixtures/bench-warmup"
#: The default topic per ``--mqtt-qos-level``: QoS 0 (and retained) and QoS 1
#: under the gateway's default ``--mqtt-qos`` rules.
_TOPIC_FOR_QOS = {0: "stocks/AAPL", 1: "fixtures/bench"}
#: Seconds an MQTT subscriber announces as its keepalive.
_MQTT_KEEPALIVE = 60

#: One subscriber, of either protocol.
Subscriber = WebSocketClient | MqttClient


@dataclasses.dataclass(frozen=True)
class Options:
    """What to measure, from the command line."""

    subscribers: int
    events: int
    rate: float
    runs: int
    modes: tuple[str, ...]
    servers: tuple[str, ...]
    json_path: Path | None
    topic: str
    publishers: int
    connect_batch: int
    pad: int
    max_buffer_bytes: int
    drain_timeout: float
    timeout: float
    log_dir: Path
    redis_url: str
    mqtt_qos_level: int = 0
    mqtt_url: str | None = None
    mosquitto: str = MOSQUITTO
    mqtt_max_queued: int = 100_000

    @property
    def broker(self) -> BrokerOptions:
        """How the MQTT configurations get their broker."""
        return BrokerOptions(
            url=self.mqtt_url, mosquitto=self.mosquitto, max_queued=self.mqtt_max_queued
        )


def _names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if "all" in names:
        return tuple(allowed)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{what} {','.join(unknown) or '(none)'!r}; choose from "
            f"{', '.join(allowed)} or all"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway fanout-bench",
        description="Fan-out benchmark: the gateway (in memory, on Redis with one "
        "or two replicas, or publishing to an MQTT broker whose subscribers are "
        "measured) against a raw websockets broadcast() server, all started here "
        "on loopback.",
    )
    add = parser.add_argument
    add("--subscribers", "-n", type=int, default=5000, help="subscribers (N)")
    add("--events", "-m", type=int, default=200, help="events per phase (M)")
    add("--rate", type=float, default=10.0, help="events/s in the steady phase")
    add("--runs", type=int, default=3, help="runs per server; medians reported")
    add(
        "--mode",
        default="all",
        help="idle, steady, burst, a comma list or all; idle is always "
        "measured, as the subscribers connect in it",
    )
    add(
        "--servers",
        default="gateway,baseline",
        help=f"comma list of {', '.join(SERVER_KINDS)}, or all",
    )
    add("--json", type=Path, default=None, help="also write results here")
    add(
        "--topic",
        default=None,
        help="the topic every subscriber holds (default: stocks/AAPL, or "
        "fixtures/bench with --mqtt-qos-level 1)",
    )
    add("--publishers", type=int, default=4, help="publishing connections")
    add("--connect-batch", type=int, default=200, help="concurrent handshakes")
    add("--pad", type=int, default=16, help="padding characters in eventDetails")
    add("--max-buffer-bytes", type=int, default=64 * 1024 * 1024)
    add(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds without a delivery after which the missing ones count as lost",
    )
    add(
        "--timeout",
        type=float,
        default=None,
        help="seconds for the whole benchmark (default: estimated from the sizes)",
    )
    add(
        "--log-dir",
        type=Path,
        default=Path("bench-results/logs"),
        help="where the servers' output goes",
    )
    add(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="the Redis of the gateway-redis configurations; each run uses a "
        "fresh key prefix and deletes its keys afterwards",
    )
    add(
        "--mqtt-qos-level",
        type=int,
        choices=(0, 1),
        default=0,
        help="QoS of the MQTT configurations: the topic's QoS under the gateway's "
        "default --mqtt-qos rules, and what MQTT subscribers ask for",
    )
    add(
        "--mqtt-url",
        default=None,
        help="an existing broker for gateway-mqtt instead of a private Mosquitto "
        "started per run (its CPU is then not measured); topics get a prefix of "
        "the run's own and subscribers log in with the URL's user, if any",
    )
    add("--mosquitto", default=MOSQUITTO, help="the Mosquitto executable")
    add(
        "--mqtt-max-queued",
        type=int,
        default=100_000,
        help="Mosquitto's max_queued_messages per subscriber; past it QoS 0 "
        "messages are dropped, and counted as lost",
    )
    return parser


def parse_args(argv: Sequence[str]) -> Options:
    """Turn the command line into options; exit with status 2 on a bad one."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    try:
        modes = _names(args.mode, MODES, "mode")
        servers = _names(args.servers, SERVER_KINDS, "server")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    for name in ("subscribers", "events", "runs", "publishers", "connect_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    topic = args.topic or _TOPIC_FOR_QOS[args.mqtt_qos_level]
    if any(uses_mqtt(kind) for kind in servers):
        problem = _mqtt_problem(topic, args.mqtt_qos_level, args.mqtt_url)
        if problem is None and args.mqtt_url is None:
            if not Path(args.mosquitto).is_file():
                problem = f"--mosquitto {args.mosquitto!r} not found"
        if problem:
            parser.error(problem)
    options = Options(
        subscribers=args.subscribers,
        events=args.events,
        rate=args.rate,
        runs=args.runs,
        modes=modes,
        servers=servers,
        json_path=args.json,
        topic=topic,
        publishers=args.publishers,
        connect_batch=args.connect_batch,
        pad=args.pad,
        max_buffer_bytes=args.max_buffer_bytes,
        drain_timeout=args.drain_timeout,
        timeout=args.timeout or 0.0,
        log_dir=args.log_dir,
        redis_url=args.redis_url,
        mqtt_qos_level=args.mqtt_qos_level,
        mqtt_url=args.mqtt_url,
        mosquitto=args.mosquitto,
        mqtt_max_queued=args.mqtt_max_queued,
    )
    if not args.timeout:
        options = _with_estimated_timeout(options)
    return options


def _mqtt_problem(topic: str, qos: int, url: str | None) -> str | None:
    """Why the MQTT options cannot be measured as asked, or None."""
    # The gateway's own rules decide the QoS it publishes at; the benchmark
    # measures them as shipped rather than setting its own.
    from gateway.transports.mqtt import (
        DEFAULT_QOS_RULES,
        parse_broker_url,
        parse_qos_rules,
        qos_for,
    )

    published, _ = qos_for(topic, parse_qos_rules(DEFAULT_QOS_RULES))
    if published != qos:
        return (
            f"the gateway publishes {topic!r} at QoS {published}, not "
            f"{qos}; choose a --topic for --mqtt-qos-level {qos}"
        )
    if url is None:
        return None
    try:
        address = parse_broker_url(url)
    except ValueError as exc:
        return f"--mqtt-url: {exc}"
    if address.host in ("127.0.0.1", "localhost", "::1") and address.port == 1883:
        return (
            "--mqtt-url: 1883 on this machine is its own broker, never used for "
            "benchmarks; leave --mqtt-url unset to start a private Mosquitto"
        )
    return None


def _with_estimated_timeout(options: Options) -> Options:
    # Generous: connecting, the steady phase at its rate, a burst at a slow
    # 10,000 deliveries/s, the drain waits, and starting and stopping.
    n, m = options.subscribers, options.events
    per_run = 60 + n / 100 + m / options.rate + n * m / 10_000
    per_run += 2 * options.drain_timeout
    total = 120 + per_run * options.runs * len(options.servers)
    return dataclasses.replace(options, timeout=total)


# Events


def event_body(topic: str, seq: int, pad: str) -> bytes:
    """One publish body, stamped with this process's clock as it is built."""
    details = {"sentAt": time.perf_counter(), "seq": seq, "pad": pad}
    return orjson.dumps(
        {
            "topic": topic,
            "eventSource": "bench",
            "eventType": "PRICE_CHANGED",
            "eventDetails": details,
        }
    )


async def wait_for_deliveries(tally: Tally, expected: int, idle_timeout: float) -> None:
    """Wait until ``expected`` events arrived or none did for ``idle_timeout`` s."""
    seen = -1
    changed = time.perf_counter()
    while tally.unique < expected:
        await asyncio.sleep(0.02)
        now = time.perf_counter()
        if tally.received != seen:
            seen = tally.received
            changed = now
        elif now - changed > idle_timeout:
            return


# Connections


async def open_publisher(server: Deployment) -> Publisher:
    """A publishing connection of the kind ``server`` takes, to its first process."""
    port = server.publish_port
    if server.is_gateway:
        return await HttpPublisher.open(
            HOST, port, server.api_key, request_timeout=_PUBLISH_TIMEOUT
        )
    return await WebSocketPublisher.open(
        HOST, port, "/publish", request_timeout=_PUBLISH_TIMEOUT
    )


async def subscribe_one(
    server: Deployment, index: int, topic: str, tally: Tally, qos: int
) -> Subscriber:
    """Open the ``index``-th subscriber to ``topic``, of the kind ``server`` takes.

    WebSocket subscribers take the server's processes in turn; MQTT ones all
    go to its broker, at most at QoS ``qos``.
    """
    if server.mqtt is None:
        ports = server.ports
        return await subscribe_websocket(ports[index % len(ports)], topic, tally)
    return await subscribe_mqtt(server, topic, tally, qos)


async def subscribe_mqtt(
    server: Deployment, topic: str, tally: Tally, qos: int
) -> MqttClient:
    """Open one MQTT subscriber: CONNECT, CONNACK, SUBSCRIBE, SUBACK."""
    broker = server.mqtt
    assert broker is not None
    client = await open_mqtt_client(
        broker.host,
        broker.port,
        tally,
        keepalive=_MQTT_KEEPALIVE,
        username=broker.username,
        password=broker.password,
        handshake_timeout=_HANDSHAKE_TIMEOUT,
    )
    try:
        async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
            granted = await client.subscribe(broker.prefix + topic, qos)
    except BaseException:
        client.abort()
        raise
    if granted != qos:
        client.abort()
        raise BenchError(f"the broker granted QoS {granted}, not {qos}")
    return client


async def subscribe_websocket(port: int, topic: str, tally: Tally) -> WebSocketClient:
    """Open one WebSocket subscriber: upgrade, welcome, subscribe, subscribed."""
    client = await open_client(
        HOST, port, "/ws", tally, handshake_timeout=_HANDSHAKE_TIMEOUT
    )
    try:
        async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
            _expect(await client.messages.get(), "welcome")
            client.send_json({"op": "subscribe", "topics": [topic]})
            _expect(await client.messages.get(), "subscribed")
    except BaseException:
        client.abort()
        raise
    return client


def _expect(message: object, kind: str) -> None:
    if not isinstance(message, dict) or message.get("type") != kind:
        raise BenchError(f"expected a {kind} message, got {message!r}"[:300])


async def connect_subscribers(
    server: Deployment,
    tally: Tally,
    options: Options,
    clients: list[Subscriber],
) -> int:
    """Connect ``options.subscribers`` clients, a batch of handshakes at a time.

    WebSocket clients take the server's processes in turn, so that each
    replica of a configuration holds the same share, give or take one. Batches
    keep the number of connections waiting in the server's listen backlog
    bounded, so that no server is judged by its backlog size. Each subscribed
    client is appended to ``clients`` at once, so that the caller can close
    them all even if this fails half way.

    Returns:
        How many clients failed to connect or subscribe.
    """
    failures = 0
    for first in range(0, options.subscribers, options.connect_batch):
        batch = range(first, min(first + options.connect_batch, options.subscribers))
        results = await asyncio.gather(
            *(
                subscribe_one(
                    server, index, options.topic, tally, options.mqtt_qos_level
                )
                for index in batch
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, WebSocketClient | MqttClient):
                clients.append(result)
            elif isinstance(result, Exception):
                failures += 1
            else:
                raise result
    return failures


async def warm_up(server: Deployment, publisher: Publisher, pad: str) -> None:
    """Deliver one event to one subscriber per process, so lazy set-up is not measured.

    With several replicas this also proves, before measuring, that an event
    published to the first one reaches subscribers of every other; with a
    broker, that the gateway's bridge is connected and publishing.
    """
    tally = Tally()
    clients: list[Subscriber] = []
    count = 1 if server.mqtt is not None else len(server.ports)
    try:
        for index in range(count):
            clients.append(await subscribe_one(server, index, WARMUP_TOPIC, tally, 1))
        await publisher.publish(event_body(WARMUP_TOPIC, 0, pad))
        await wait_for_deliveries(tally, len(clients), _HANDSHAKE_TIMEOUT)
    finally:
        for client in clients:
            client.abort()
    if tally.received != len(clients):
        raise BenchError(
            f"{server.kind}: {tally.received} of {len(clients)} subscribers got "
            "the warm-up event"
        )


# Phases


async def idle_phase(
    server: Deployment,
    tally: Tally,
    options: Options,
    clients: list[Subscriber],
) -> dict[str, float]:
    """Connect the subscribers and measure the memory each one costs the server.

    With several processes, their memory is summed and its growth divided by
    every subscriber, wherever it is connected; with a broker, the broker's
    memory is in the sum.
    """
    before = server.rss_bytes()
    failures = await connect_subscribers(server, tally, options, clients)
    await asyncio.sleep(_SETTLE)
    after = server.rss_bytes()
    count = max(len(clients), 1)
    return {
        "processes": len(server.processes),
        "replicas": len(server.servers),
        "subscribers": len(clients),
        "connect_failures": failures,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "kb_per_connection": (after - before) / count / 1024,
    }


async def steady_phase(
    server: Deployment,
    publishers: Sequence[Publisher],
    tally: Tally,
    subscribers: int,
    options: Options,
) -> dict[str, float]:
    """Publish ``options.events`` at ``options.rate`` per second, on a fixed clock.

    The schedule is open-loop: each event goes at its time on whichever
    publisher is free, without waiting for the previous answer, so a server
    that falls behind shows it in latency instead of slowing the publisher
    down. An event sent more than ``_LATE`` seconds after its time (every
    publisher was busy, or this process was) counts as behind schedule.
    """
    tally.reset()
    pad = "x" * options.pad
    interval = 1.0 / options.rate
    free: asyncio.Queue[Publisher] = asyncio.Queue()
    for publisher in publishers:
        free.put_nowait(publisher)

    async def send(publisher: Publisher, body: bytes) -> None:
        await publisher.publish(body)
        free.put_nowait(publisher)

    sends = []
    behind = 0
    start = Readings.take(server)
    for seq in range(options.events):
        due = start.at + seq * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        publisher = await free.get()
        if time.perf_counter() - due > _LATE:
            behind += 1
        body = event_body(options.topic, seq, pad)
        sends.append(asyncio.ensure_future(send(publisher, body)))
    await asyncio.gather(*sends)
    expected = subscribers * options.events
    await wait_for_deliveries(tally, expected, options.drain_timeout)
    metrics = phase_metrics(server, tally, start, expected)
    metrics["behind_schedule"] = behind
    return metrics


async def burst_phase(
    server: Deployment,
    publishers: Sequence[Publisher],
    tally: Tally,
    subscribers: int,
    options: Options,
) -> dict[str, float]:
    """Publish ``options.events`` as fast as the server answers.

    Each publisher has one event in flight; with two or more, the server finds
    the next event waiting as soon as it has fanned out the previous one.
    """
    tally.reset()
    pad = "x" * options.pad
    sequence = iter(range(options.events))

    async def pump(publisher: Publisher) -> None:
        # The iterator is shared: each publisher takes the next number.
        for seq in sequence:
            await publisher.publish(event_body(options.topic, seq, pad))

    start = Readings.take(server)
    await asyncio.gather(*(pump(publisher) for publisher in publishers))
    expected = subscribers * options.events
    await wait_for_deliveries(tally, expected, options.drain_timeout)
    return phase_metrics(server, tally, start, expected)


# Runs


async def _phases(
    server: Deployment, options: Options, clients: list[Subscriber]
) -> dict[str, float]:
    publishers = [await open_publisher(server) for _ in range(options.publishers)]
    try:
        await warm_up(server, publishers[0], "x" * options.pad)
        tally = Tally()
        idle = await idle_phase(server, tally, options, clients)
        metrics = {f"idle.{key}": value for key, value in idle.items()}
        # Hide the long-lived connection objects from the garbage collector:
        # with thousands of them, each full collection would stall every
        # subscriber for milliseconds and show up as latency.
        gc.collect()
        gc.freeze()
        if "steady" in options.modes:
            before = await bridge_counters(server)
            steady = await steady_phase(
                server, publishers, tally, len(clients), options
            )
            steady |= _difference(await bridge_counters(server), before)
            metrics.update({f"steady.{key}": value for key, value in steady.items()})
        if "burst" in options.modes:
            before = await bridge_counters(server)
            burst = await burst_phase(server, publishers, tally, len(clients), options)
            burst |= _difference(await bridge_counters(server), before)
            metrics.update({f"burst.{key}": value for key, value in burst.items()})
        return metrics
    finally:
        for publisher in publishers:
            publisher.close()


def _difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


async def measure(kind: str, options: Options) -> dict[str, float]:
    """One run against one configuration, started and stopped here."""
    server = start_deployment(
        kind,
        options.log_dir,
        max_buffer_bytes=options.max_buffer_bytes,
        redis_url=options.redis_url,
        broker=options.broker,
    )
    clients: list[Subscriber] = []
    try:
        await server.wait_ready(_START_TIMEOUT)
        return await _phases(server, options, clients)
    finally:
        # The clients leave first, so that the server stops without a closing
        # handshake per connection.
        for client in clients:
            client.abort()
        await asyncio.sleep(0)
        if server.mqtt is not None and server.mqtt.external:
            await clear_retained(server, (options.topic, WARMUP_TOPIC))
        server.stop()
        gc.unfreeze()


async def clear_retained(server: Deployment, topics: Sequence[str]) -> None:
    """Remove the messages the run left retained on a broker it was given.

    An empty retained publish removes a topic's retained message. A broker
    whose ACL refuses this client's publishes keeps them; that is reported,
    not fatal, since the run's topics carry a prefix nobody else uses.
    """
    broker = server.mqtt
    assert broker is not None
    try:
        client = await open_mqtt_client(
            broker.host,
            broker.port,
            Tally(),
            username=broker.username,
            password=broker.password,
            handshake_timeout=_HANDSHAKE_TIMEOUT,
        )
    except (BenchError, OSError, TimeoutError) as exc:
        print(
            f"fanout-bench: retained messages under {broker.prefix!r} not "
            f"cleared: {exc}",
            file=sys.stderr,
        )
        return
    for topic in topics:
        client.publish(broker.prefix + topic, b"", retain=True)
    client.disconnect()
    await client.closed


async def run_all(options: Options) -> Results:
    """Every run of every server, interleaved, within ``options.timeout``."""
    results: Results = {kind: [] for kind in options.servers}
    if any(uses_redis(kind) for kind in options.servers):
        check_redis(options.redis_url)
    async with asyncio.timeout(options.timeout):
        for run in range(options.runs):
            # Alternate the order, so that no configuration always follows the
            # same other's leftovers (sockets in TIME_WAIT, a warm CPU cache).
            order = options.servers if run % 2 == 0 else options.servers[::-1]
            for kind in order:
                metrics = await measure(kind, options)
                results[kind].append(metrics)
                _progress(run, kind, metrics, options)
    return results


def _progress(run: int, kind: str, metrics: dict[str, float], options: Options) -> None:
    parts = [f"run {run + 1}/{options.runs} {kind}:"]
    parts.append(f"{metrics['idle.kb_per_connection']:.1f} KB/conn")
    if "steady.p99_ms" in metrics:
        steady = _faults(metrics, "steady")
        parts.append(f"steady p99 {metrics['steady.p99_ms']:.1f} ms, {steady}")
    if "burst.deliveries_per_s" in metrics:
        burst = _faults(metrics, "burst")
        parts.append(f"burst {metrics['burst.deliveries_per_s']:,.0f}/s, {burst}")
    print(" ".join(parts), file=sys.stderr, flush=True)


def _faults(metrics: dict[str, float], phase: str) -> str:
    text = f"lost {metrics[f'{phase}.lost']:.0f}"
    # Duplicates are rare enough to be worth a word only when there are some.
    if metrics[f"{phase}.duplicates"]:
        text += f", {metrics[f'{phase}.duplicates']:.0f} duplicates"
    return text


def main(argv: list[str]) -> int:
    """Run the benchmark; print the report; return the exit status."""
    stop_on_sigterm()
    options = parse_args(argv)
    limit = raise_open_files_limit()
    if limit < options.subscribers + 256:
        print(
            f"fanout-bench: the open-files limit is {limit}, too low for "
            f"{options.subscribers} subscribers",
            file=sys.stderr,
        )
        return 2
    try:
        results = uvloop.run(run_all(options))
    except (BenchError, OSError, EOFError, TimeoutError) as exc:
        # EOFError: a server hung up mid-answer (asyncio.IncompleteReadError).
        print(f"fanout-bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(render_report(results, options))
    if options.json_path is not None:
        write_json(options.json_path, results, options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
