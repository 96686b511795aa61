"""The servers under test, each run as subprocesses on free loopback ports.

A configuration (``--servers``) is one process, several gateway replicas sharing
a Redis, or the gateway with the MQTT broker its subscribers use: the benchmark
starts it afresh for every run and measures it from outside, CPU time and
resident memory through psutil, summed over its processes, and readiness by
asking each gateway or baseline process for ``/healthz`` and a broker for a
CONNACK.

========================= ========= ===========================================
configuration             processes state, subscribers
========================= ========= ===========================================
``gateway``               1         in memory; WebSocket
``gateway-redis``         1         Redis, under a key prefix of the run's own
``gateway-redis-2``       2         Redis, under a key prefix of the run's own
``gateway-mqtt``          2         in memory; MQTT on a private Mosquitto
``gateway-embedded-mqtt`` 1 (+1)    in memory; MQTT on the embedded broker
``baseline``              1         ``clients.baseline_server``, no state
========================= ========= ===========================================

``gateway-mqtt`` starts its own Mosquitto on a free loopback port with a
configuration written for the run, and points the gateway's ``--mqtt-url`` at it;
the machine's own broker is never used. Given a broker URL instead, it uses that
broker (whose CPU is then not measured), under a topic prefix of the run's own.
``gateway-embedded-mqtt`` runs the gateway with its embedded broker
(``--mqtt-broker embedded``) on free ports; the gateway starts the broker as its
child process, whose CPU and memory count as the broker's. Every other gateway
configuration runs with MQTT off (``--mqtt-broker none``), so that no broker's
work is mixed into the WebSocket figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from clients._mqtt_wire import open_mqtt_client
from clients._redis import RedisRun
from clients._wire import BenchError, Tally

__all__ = [
    "HOST",
    "MOSQUITTO",
    "SERVER_KINDS",
    "BrokerOptions",
    "Deployment",
    "MqttEndpoint",
    "ServerProcess",
    "raise_open_files_limit",
    "start_deployment",
    "uses_mqtt",
    "uses_redis",
]

HOST = "127.0.0.1"


@dataclass(frozen=True)
class _Kind:
    """What one name in ``--servers`` starts."""

    program: str
    replicas: int
    redis: bool
    #: Where MQTT subscribers connect: no broker ("none", WebSocket subscribers),
    #: a Mosquitto the benchmark starts or is given ("mosquitto"), the gateway's
    #: own ("embedded").
    broker: str = "none"


_KINDS = {
    "gateway": _Kind("gateway", 1, redis=False),
    "gateway-redis": _Kind("gateway", 1, redis=True),
    "gateway-redis-2": _Kind("gateway", 2, redis=True),
    "gateway-mqtt": _Kind("gateway", 1, redis=False, broker="mosquitto"),
    "gateway-embedded-mqtt": _Kind("gateway", 1, redis=False, broker="embedded"),
    "baseline": _Kind("baseline", 1, redis=False),
}
#: Names accepted by ``--servers``.
SERVER_KINDS = tuple(_KINDS)
#: Variables of the benchmark's own environment that would change what a gateway
#: configuration is: each one sets them itself or leaves them unset. The MQTT
#: bridge's QoS rules and buffer are among them, so that the defaults are measured.
_OWN_SETTINGS = (
    "GATEWAY_REDIS_URL",
    "GATEWAY_REDIS_PREFIX",
    "GATEWAY_REPLICA",
    "GATEWAY_MQTT_URL",
    "GATEWAY_MQTT_BROKER",
    "GATEWAY_MQTT_PORT",
    "GATEWAY_MQTT_WS_PORT",
    "GATEWAY_MQTT_PREFIX",
    "GATEWAY_MQTT_BUFFER",
    "GATEWAY_MQTT_CLIENT_ID",
    "GATEWAY_MQTT_QOS",
)
#: The project's root, so that ``-m gateway`` and ``-m clients...`` import.
_ROOT = Path(__file__).resolve().parent.parent
#: Where Debian and Ubuntu install the broker.
MOSQUITTO = "/usr/sbin/mosquitto"
#: Seconds a readiness probe may take.
_PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class BrokerOptions:
    """How the MQTT configurations get their broker."""

    #: An existing broker to use instead of starting Mosquitto, or None.
    url: str | None = None
    #: The Mosquitto executable started for each run when ``url`` is None.
    mosquitto: str = MOSQUITTO
    #: Mosquitto's ``max_queued_messages``: messages held per subscriber beyond
    #: those in flight. Past it Mosquitto drops a QoS 0 message for that
    #: subscriber, which the benchmark counts as lost.
    max_queued: int = 100_000
    #: Mosquitto's ``max_inflight_messages``: QoS 1 messages sent to one
    #: subscriber and not yet acknowledged.
    max_inflight: int = 100


@dataclass(frozen=True)
class MqttEndpoint:
    """Where a configuration's MQTT subscribers connect, and as whom."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    #: What the gateway puts before every topic it publishes (``--mqtt-prefix``).
    prefix: str = ""
    #: True for a broker the benchmark was given rather than started.
    external: bool = False


@dataclass
class ServerProcess:
    """One process started by the benchmark: a server, or one gateway replica."""

    #: The configuration's name, with the replica's number if it has several.
    name: str
    process: subprocess.Popen[bytes]
    port: int
    #: Where the process's stdout and stderr go.
    log_path: Path
    #: What its CPU time is reported as: ``gateway``, ``baseline`` or ``broker``.
    role: str = "gateway"
    #: How readiness is asked: ``http`` (``GET /healthz``) or ``mqtt`` (CONNACK).
    probe: str = "http"
    #: The role its child processes' CPU and memory count under (a broker the
    #: gateway started itself), or None to leave them out.
    children_role: str | None = None
    #: Whether SIGTERM was sent already: a second one may cut a graceful stop
    #: short, so it is never sent.
    _terminated: bool = field(default=False, init=False, repr=False)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time the process has used so far, in seconds."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user), float(times.system)

    def children_cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU seconds of its running child processes, summed."""
        user = system = 0.0
        for child in psutil.Process(self.pid).children(recursive=True):
            # A child that ended in between has nothing left to count.
            with contextlib.suppress(psutil.NoSuchProcess):
                times = child.cpu_times()
                user += float(times.user)
                system += float(times.system)
        return user, system

    def rss_bytes(self, *, children: bool = False) -> int:
        """The process's resident memory now, and its children's if asked."""
        parent = psutil.Process(self.pid)
        total = int(parent.memory_info().rss)
        if children:
            for child in parent.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += int(child.memory_info().rss)
        return total

    def log_tail(self, lines: int = 20) -> str:
        """The end of what the process wrote to stdout and stderr."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, within: float) -> None:
        """Wait until ``GET /healthz`` is answered with 200, or a CONNACK comes.

        The gateway and the baseline serve that path, so the probe is a
        well-formed request rather than a connection dropped mid-handshake,
        which a server may log as an error; a broker gets a whole MQTT
        connection, ended with DISCONNECT.

        Raises:
            BenchError: the process exited, or was not ready within ``within``
                seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.process.returncode}:\n"
                    f"{self.log_tail()}"
                )
            probe = _healthy if self.probe == "http" else _mqtt_ready
            with contextlib.suppress(
                OSError, asyncio.IncompleteReadError, BenchError, TimeoutError
            ):
                if await probe(self.port):
                    return
            await asyncio.sleep(0.05)
        raise BenchError(f"{self.name} was not ready within {within} s")

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM, once) without waiting for it."""
        if self.process.poll() is None and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
        self._terminated = True

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the process: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


@dataclass
class Deployment:
    """One configuration under test: a server, gateway replicas sharing Redis, or
    the gateway and an MQTT broker.

    WebSocket subscribers are spread over the servers (every process but a
    broker) in turn; MQTT subscribers connect to ``mqtt``. Publishers talk to the
    first server. CPU and memory readings are sums over every process, the
    broker's included, and CPU is also kept apart per role.
    """

    kind: str
    processes: list[ServerProcess]
    #: The bearer key of ``POST /events``, the same on every replica.
    api_key: str
    #: The run's key prefix in Redis, for configurations that use it.
    redis: RedisRun | None = None
    #: The broker of MQTT subscribers; None when they use WebSocket.
    mqtt: MqttEndpoint | None = None

    @property
    def is_gateway(self) -> bool:
        """Whether this runs the gateway (publish over HTTP) or the baseline."""
        return _KINDS[self.kind].program == "gateway"

    @property
    def servers(self) -> list[ServerProcess]:
        """The gateway or baseline processes, without the broker."""
        return [process for process in self.processes if process.role != "broker"]

    @property
    def publish_port(self) -> int:
        """The port events are published to: the first server's."""
        return self.servers[0].port

    @property
    def ports(self) -> list[int]:
        """Every server's port, in the order WebSocket subscribers take them."""
        return [process.port for process in self.servers]

    def cpu_by_role(self) -> dict[str, tuple[float, float]]:
        """User and system CPU seconds used so far, summed per role."""
        roles: dict[str, tuple[float, float]] = {}
        for process in self.processes:
            parts = [(process.role, process.cpu_seconds())]
            if process.children_role is not None:
                parts.append((process.children_role, process.children_cpu_seconds()))
            for role, (user, system) in parts:
                before = roles.get(role, (0.0, 0.0))
                roles[role] = (before[0] + user, before[1] + system)
        return roles

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU seconds used so far, summed over the processes."""
        times = self.cpu_by_role().values()
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def rss_bytes(self) -> int:
        """Resident memory now, summed over the processes."""
        return sum(
            process.rss_bytes(children=process.children_role is not None)
            for process in self.processes
        )

    async def wait_ready(self, within: float) -> None:
        """Wait until every process answers ``/healthz``; see ``ServerProcess``."""
        await asyncio.gather(*(p.wait_ready(within) for p in self.processes))

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process, then delete the run's keys in Redis.

        The servers are asked to stop together, so that their graceful
        shutdowns overlap, and the broker after them, so that the gateway's
        bridge does not spend its shutdown reconnecting; the keys go last, once
        no replica can write any.

        Raises:
            BenchError: the keys could not be deleted.
        """
        try:
            for process in self.servers:
                process.terminate()
            for process in self.servers:
                process.stop(timeout)
        finally:
            try:
                for process in self.processes:
                    process.stop(timeout)
            finally:
                self._forget_keys()

    def _forget_keys(self) -> None:
        if self.redis is not None:
            self.redis.delete_keys()


async def _healthy(port: int) -> bool:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(
            f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(5):
            status = await reader.readline()
        return status.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def _mqtt_ready(port: int) -> bool:
    client = await open_mqtt_client(
        HOST, port, Tally(), handshake_timeout=_PROBE_TIMEOUT
    )
    client.disconnect()
    return True


def raise_open_files_limit() -> int:
    """Raise this process's open-files soft limit to the hard limit.

    Servers started afterwards inherit it.

    Returns:
        The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def uses_redis(kind: str) -> bool:
    """Whether the configuration named ``kind`` keeps its state in Redis."""
    return _KINDS[kind].redis


def uses_mqtt(kind: str) -> bool:
    """Whether the configuration named ``kind`` has MQTT subscribers."""
    return _KINDS[kind].broker != "none"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _command(program: str, port: int) -> list[str]:
    if program == "gateway":
        return [sys.executable, "-m", "gateway", "serve"]
    return [
        sys.executable,
        "-m",
        "clients.baseline_server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


def _launch(
    command: list[str], name: str, port: int, log_dir: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output appended to ``<log_dir>/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        # Runs append to the same file: a header tells whose lines follow.
        prefix = env.get("GATEWAY_REDIS_PREFIX")
        header = f"--- fanout-bench {time.strftime('%Y-%m-%dT%H:%M:%S')} {name}"
        header += f" port {port}" + (f" redis prefix {prefix}" if prefix else "")
        log.write(f"{header} ---\n".encode())
        log.flush()
        return subprocess.Popen(
            command,
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _spawn(
    program: str, name: str, log_dir: Path, settings: dict[str, str]
) -> ServerProcess:
    """Start one process on a free port with ``settings`` added to its environment."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in _OWN_SETTINGS}
    env.update(settings)
    env.update({"GATEWAY_HOST": HOST, "GATEWAY_PORT": str(port)})
    process = _launch(_command(program, port), name, port, log_dir, env)
    return ServerProcess(name, process, port, log_dir / f"{name}.log", role=program)


def mosquitto_config(port: int, options: BrokerOptions) -> str:
    """A Mosquitto configuration for one run: loopback only, anonymous, no disk.

    Its limits are set high, as the gateway's outbound buffer is, so that the
    benchmark measures speed rather than the slow-subscriber policy; Nagle's
    algorithm is off, as it is on the gateway's sockets.
    """
    lines = [
        "# Written by gateway fanout-bench for one run (clients/_servers.py).",
        f"listener {port} {HOST}",
        "allow_anonymous true",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "connection_messages false",
        "set_tcp_nodelay true",
        f"max_queued_messages {options.max_queued}",
        f"max_inflight_messages {options.max_inflight}",
        # Run as root, Mosquitto would switch to the user "mosquitto"; as
        # anyone else it ignores this line.
        f"user {getpass.getuser()}",
    ]
    return "\n".join(lines) + "\n"


def _start_mosquitto(name: str, log_dir: Path, options: BrokerOptions) -> ServerProcess:
    """Start a private Mosquitto on a free port and wait until it listens.

    Raises:
        BenchError: it exited or did not listen within ``_PROBE_TIMEOUT`` s.
    """
    port = _free_port()
    config = log_dir / f"{name}.conf"
    config.write_text(mosquitto_config(port, options))
    command = [options.mosquitto, "-c", str(config)]
    process = _launch(command, name, port, log_dir, dict(os.environ))
    broker = ServerProcess(
        name, process, port, log_dir / f"{name}.log", role="broker", probe="mqtt"
    )
    # Listening before the gateway starts, so that its bridge connects at the
    # first attempt; the MQTT handshake is checked later with the rest.
    deadline = time.monotonic() + _PROBE_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(
                f"{name} exited with {process.returncode}:\n{broker.log_tail()}"
            )
        with contextlib.suppress(OSError):
            socket.create_connection((HOST, port), 1).close()
            return broker
        time.sleep(0.02)
    broker.stop()
    raise BenchError(f"{name} did not listen within {_PROBE_TIMEOUT} s")


def _external_broker(url: str) -> MqttEndpoint:
    """The endpoint of a broker given by URL, with a topic prefix of the run's own."""
    parts = urlsplit(url)
    return MqttEndpoint(
        host=parts.hostname or HOST,
        port=parts.port or 1883,
        username=parts.username,
        password=parts.password,
        prefix=f"fanout-bench/{secrets.token_hex(6)}/",
        external=True,
    )


def start_deployment(
    kind: str,
    log_dir: Path,
    *,
    max_buffer_bytes: int,
    redis_url: str,
    broker: BrokerOptions | None = None,
    extra_settings: dict[str, str] | None = None,
) -> Deployment:
    """Start one configuration's processes on free loopback ports; none is ready yet.

    A private broker is the exception: it listens when this returns.

    Args:
        kind: one of ``SERVER_KINDS``.
        log_dir: where the output goes, appended to one file per process:
            ``<kind>.log``, or ``<kind>.<n>.log`` for the n-th of several
            replicas, and ``<kind>.broker.log`` with ``<kind>.broker.conf``
            for a broker started here.
        max_buffer_bytes: the gateway's outbound buffer cap per client, set
            high so that the benchmark measures speed, not the slow-client
            policy.
        redis_url: the Redis of the configurations that use one; each start
            takes a fresh key prefix in it.
        broker: how the MQTT configurations get their broker; defaults apply
            when None.
        extra_settings: more ``GATEWAY_`` variables for every gateway process
            (such as ``GATEWAY_POLL_INTERVAL``); the configuration's own win.

    Raises:
        ValueError: ``kind`` is not one of ``SERVER_KINDS``.
        BenchError: a private broker did not start.
    """
    spec = _KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown server {kind!r}; choose from {SERVER_KINDS}")
    broker = broker or BrokerOptions()
    api_key = secrets.token_urlsafe(16)
    settings = dict(extra_settings or {}) | {
        "GATEWAY_API_KEY": api_key,
        "GATEWAY_MAX_BUFFER_BYTES": str(max_buffer_bytes),
        "GATEWAY_LOG_LEVEL": "warning",
    }
    run = RedisRun(redis_url) if spec.redis else None
    if run is not None:
        settings["GATEWAY_REDIS_URL"] = run.url
        settings["GATEWAY_REDIS_PREFIX"] = run.prefix
    log_dir.mkdir(parents=True, exist_ok=True)
    deployment = Deployment(kind, [], api_key, run)
    try:
        settings |= _mqtt_settings(deployment, spec, log_dir, broker)
        for index in range(1, spec.replicas + 1):
            name = kind if spec.replicas == 1 else f"{kind}.{index}"
            replica = {"GATEWAY_REPLICA": f"bench-{name}"} if spec.redis else {}
            process = _spawn(spec.program, name, log_dir, settings | replica)
            if spec.broker == "embedded":
                process.children_role = "broker"
            deployment.processes.append(process)
    except BaseException:
        # Whatever started already must not outlive the benchmark.
        deployment.stop()
        raise
    return deployment


def _mqtt_settings(
    deployment: Deployment, spec: _Kind, log_dir: Path, options: BrokerOptions
) -> dict[str, str]:
    """The gateway's MQTT settings for ``spec``; start its broker if it needs one.

    Sets ``deployment.mqtt`` and adds a private broker to its processes.
    """
    if spec.program != "gateway":
        return {}
    if spec.broker == "none":
        # Without this, a gateway would start its embedded broker, on 1883.
        return {"GATEWAY_MQTT_BROKER": "none"}
    if spec.broker == "embedded":
        port = _free_port()
        deployment.mqtt = MqttEndpoint(HOST, port)
        return {
            "GATEWAY_MQTT_BROKER": "embedded",
            "GATEWAY_MQTT_PORT": str(port),
            "GATEWAY_MQTT_WS_PORT": str(_free_port()),
        }
    if options.url is not None:
        endpoint = _external_broker(options.url)
        deployment.mqtt = endpoint
        return {
            "GATEWAY_MQTT_URL": options.url,
            "GATEWAY_MQTT_PREFIX": endpoint.prefix,
            "GATEWAY_MQTT_CLIENT_ID": endpoint.prefix.replace("/", "-").strip("-"),
        }
    broker = _start_mosquitto(f"{deployment.kind}.broker", log_dir, options)
    deployment.processes.append(broker)
    deployment.mqtt = MqttEndpoint(HOST, broker.port)
    return {"GATEWAY_MQTT_URL": f"mqtt://{HOST}:{broker.port}"}
