"""The servers under test, each run as subprocesses on free loopback ports.

A configuration (``--servers``) is one process, or several gateway replicas sharing
a Redis: the benchmark starts it afresh for every run and measures it from outside,
CPU time and resident memory through psutil, summed over its processes, and
readiness by asking each process for ``/healthz``.

=================== ========= =========================================
configuration       processes state
=================== ========= =========================================
``gateway``         1         in memory
``gateway-redis``   1         Redis, under a key prefix of the run's own
``gateway-redis-2`` 2         Redis, under a key prefix of the run's own
``baseline``        1         ``clients.baseline_server``, no state
=================== ========= =========================================
"""

from __future__ import annotations

import asyncio
import contextlib
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

import psutil

from clients._redis import RedisRun
from clients._wire import BenchError

__all__ = [
    "HOST",
    "SERVER_KINDS",
    "Deployment",
    "ServerProcess",
    "raise_open_files_limit",
    "start_deployment",
    "uses_redis",
]

HOST = "127.0.0.1"


@dataclass(frozen=True)
class _Kind:
    """What one name in ``--servers`` starts."""

    program: str
    replicas: int
    redis: bool


_KINDS = {
    "gateway": _Kind("gateway", 1, redis=False),
    "gateway-redis": _Kind("gateway", 1, redis=True),
    "gateway-redis-2": _Kind("gateway", 2, redis=True),
    "baseline": _Kind("baseline", 1, redis=False),
}
#: Names accepted by ``--servers``.
SERVER_KINDS = tuple(_KINDS)
#: Variables of the benchmark's own environment that would change what a gateway
#: configuration is: each one sets them itself or leaves them unset.
_OWN_SETTINGS = ("GATEWAY_REDIS_URL", "GATEWAY_REDIS_PREFIX", "GATEWAY_REPLICA")
#: The project's root, so that ``-m gateway`` and ``-m clients...`` import.
_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerProcess:
    """One process started by the benchmark: a server, or one gateway replica."""

    #: The configuration's name, with the replica's number if it has several.
    name: str
    process: subprocess.Popen[bytes]
    port: int
    #: Where the process's stdout and stderr go.
    log_path: Path
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

    def rss_bytes(self) -> int:
        """The process's resident memory now."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def log_tail(self, lines: int = 20) -> str:
        """The end of what the process wrote to stdout and stderr."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, within: float) -> None:
        """Wait until ``GET /healthz`` is answered with 200.

        Both servers serve that path, so the probe is a well-formed request
        rather than a connection dropped mid-handshake, which a server may log
        as an error.

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
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                if await _healthy(self.port):
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
    """One configuration under test: a server, or gateway replicas sharing Redis.

    Subscribers are spread over ``processes`` in turn; publishers talk to the
    first one. CPU and memory readings are sums over every process.
    """

    kind: str
    processes: list[ServerProcess]
    #: The bearer key of ``POST /events``, the same on every replica.
    api_key: str
    #: The run's key prefix in Redis, for configurations that use it.
    redis: RedisRun | None = None

    @property
    def is_gateway(self) -> bool:
        """Whether this runs the gateway (publish over HTTP) or the baseline."""
        return _KINDS[self.kind].program == "gateway"

    @property
    def publish_port(self) -> int:
        """The port events are published to: the first process's."""
        return self.processes[0].port

    @property
    def ports(self) -> list[int]:
        """Every process's port, in the order subscribers are spread over them."""
        return [process.port for process in self.processes]

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU seconds used so far, summed over the processes."""
        times = [process.cpu_seconds() for process in self.processes]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def rss_bytes(self) -> int:
        """Resident memory now, summed over the processes."""
        return sum(process.rss_bytes() for process in self.processes)

    async def wait_ready(self, within: float) -> None:
        """Wait until every process answers ``/healthz``; see ``ServerProcess``."""
        await asyncio.gather(*(p.wait_ready(within) for p in self.processes))

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process, then delete the run's keys in Redis.

        The processes are asked to stop together, so that their graceful
        shutdowns overlap; the keys go last, once no replica can write any.

        Raises:
            BenchError: the keys could not be deleted.
        """
        try:
            for process in self.processes:
                process.terminate()
            for process in self.processes:
                process.stop(timeout)
        finally:
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


def _spawn(
    program: str, name: str, log_dir: Path, settings: dict[str, str]
) -> ServerProcess:
    """Start one process on a free port with ``settings`` added to its environment."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in _OWN_SETTINGS}
    env.update(settings)
    env.update({"GATEWAY_HOST": HOST, "GATEWAY_PORT": str(port)})
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        # Runs append to the same file: a header tells whose lines follow.
        prefix = settings.get("GATEWAY_REDIS_PREFIX")
        header = f"--- fanout-bench {time.strftime('%Y-%m-%dT%H:%M:%S')} {name}"
        header += f" port {port}" + (f" redis prefix {prefix}" if prefix else "")
        log.write(f"{header} ---\n".encode())
        log.flush()
        process = subprocess.Popen(
            _command(program, port),
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServerProcess(name, process, port, log_path)


def start_deployment(
    kind: str, log_dir: Path, *, max_buffer_bytes: int, redis_url: str
) -> Deployment:
    """Start one configuration's processes on free loopback ports; none is ready yet.

    Args:
        kind: one of ``SERVER_KINDS``.
        log_dir: where the output goes, appended to one file per process:
            ``<kind>.log``, or ``<kind>.<n>.log`` for the n-th of several
            replicas.
        max_buffer_bytes: the gateway's outbound buffer cap per client, set
            high so that the benchmark measures speed, not the slow-client
            policy.
        redis_url: the Redis of the configurations that use one; each start
            takes a fresh key prefix in it.

    Raises:
        ValueError: ``kind`` is not one of ``SERVER_KINDS``.
    """
    spec = _KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown server {kind!r}; choose from {SERVER_KINDS}")
    api_key = secrets.token_urlsafe(16)
    settings = {
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
    for index in range(1, spec.replicas + 1):
        name = kind if spec.replicas == 1 else f"{kind}.{index}"
        replica = {"GATEWAY_REPLICA": f"bench-{name}"} if spec.redis else {}
        try:
            process = _spawn(spec.program, name, log_dir, settings | replica)
        except BaseException:
            # Whatever started already must not outlive the benchmark.
            deployment.stop()
            raise
        deployment.processes.append(process)
    return deployment
