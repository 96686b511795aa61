"""The servers under test, each run as a subprocess on a free loopback port.

The benchmark starts a fresh server for every run and measures it from outside:
CPU time and resident memory through psutil, readiness by connecting to its port.
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
from dataclasses import dataclass
from pathlib import Path

import psutil

from clients._wire import BenchError

__all__ = [
    "HOST",
    "SERVER_KINDS",
    "ServerProcess",
    "raise_open_files_limit",
    "start_server",
]

HOST = "127.0.0.1"
#: Names accepted by ``--servers``.
SERVER_KINDS = ("gateway", "baseline")
#: The project's root, so that ``-m gateway`` and ``-m clients...`` import.
_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerProcess:
    """One server started by the benchmark."""

    kind: str
    process: subprocess.Popen[bytes]
    port: int
    api_key: str
    log_path: Path

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time the server has used so far, in seconds."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user), float(times.system)

    def rss_bytes(self) -> int:
        """The server's resident memory now."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def log_tail(self, lines: int = 20) -> str:
        """The end of what the server wrote to stdout and stderr."""
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
                    f"{self.kind} exited with {self.process.returncode}:\n"
                    f"{self.log_tail()}"
                )
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                if await _healthy(self.port):
                    return
            await asyncio.sleep(0.05)
        raise BenchError(f"{self.kind} was not ready within {within} s")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _command(kind: str, port: int) -> list[str]:
    if kind == "gateway":
        return [sys.executable, "-m", "gateway", "serve"]
    if kind == "baseline":
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
    raise ValueError(f"unknown server {kind!r}; choose from {SERVER_KINDS}")


def start_server(kind: str, log_dir: Path, *, max_buffer_bytes: int) -> ServerProcess:
    """Start one server on a free loopback port; it is not ready yet.

    Args:
        kind: ``gateway`` or ``baseline``.
        log_dir: where the server's output goes, appended to one file per kind.
        max_buffer_bytes: the gateway's outbound buffer cap per client, set
            high so that the benchmark measures speed, not the slow-client
            policy.
    """
    port = _free_port()
    api_key = secrets.token_urlsafe(16)
    env = dict(os.environ)
    env.update(
        {
            "GATEWAY_HOST": HOST,
            "GATEWAY_PORT": str(port),
            "GATEWAY_API_KEY": api_key,
            "GATEWAY_MAX_BUFFER_BYTES": str(max_buffer_bytes),
            "GATEWAY_LOG_LEVEL": "warning",
        }
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{kind}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            _command(kind, port),
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServerProcess(kind, process, port, api_key, log_path)
