"""Running the application under uvicorn with the gateway's WebSocket transport."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import resource
import signal
import socket
from types import FrameType

import uvicorn

from gateway.app import create_app
from gateway.config import Settings
from gateway.runtime import Runtime
from gateway.state.base import StateBackend
from gateway.state.memory import MemoryBackend
from gateway.state.redis import RedisBackend
from gateway.transports.http import GatewayHttpProtocol, quiet_bad_requests
from gateway.transports.websocket import WebSocketProtocol

__all__ = ["GatewayServer", "build_server"]

logger = logging.getLogger(__name__)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, with readiness turned off first on SIGTERM or SIGINT.

    A signal starts a graceful stop: ``/readyz`` answers 503 and new WebSocket
    handshakes are refused at once, listening stops, every client gets close 1001
    and the process exits 0 once they are gone or ``shutdown_timeout`` has passed.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler would re-raise the signal after shutdown, which
        # ends the process with a signal status; a requested stop exits 0 here.
        if self.runtime.draining or self._loop is None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        logger.info("received %s: draining", signal.Signals(sig).name)
        self.runtime.draining = True
        # Signal handlers run between two steps of the loop; do the work in it.
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """Close WebSocket clients now; stop listening after the drain delay."""
        for connection in list(self.server_state.connections):
            if isinstance(connection, WebSocketProtocol):
                try:
                    connection.shutdown()
                except Exception:
                    # One broken connection must not keep the others open.
                    logger.exception("closing connection %s failed", connection.id)
        assert self._loop is not None
        self._loop.call_later(self.runtime.settings.drain_delay, self._stop)

    def _stop(self) -> None:
        self.should_exit = True


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one; return the new limit.

    Every WebSocket connection holds a file descriptor, and the usual soft limit
    of 1,024 would cap a replica far below what it can serve.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open files limit: %s", exc)
    return soft


def make_backend(settings: Settings) -> StateBackend:
    """The Redis backend when a URL is set, else the in-memory one."""
    if settings.redis_url is None:
        return MemoryBackend(history_size=settings.history_size)
    return RedisBackend(
        settings.redis_url,
        replica=settings.replica,
        prefix=settings.redis_prefix,
        history_size=settings.history_size,
        record_ttl=settings.record_ttl,
    )


def bind(settings: Settings) -> socket.socket:
    """Bind the listening socket, failing with a message that names the flag.

    Raises:
        OSError: the address cannot be bound; the message says what to change.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            change = "check --host or GATEWAY_HOST"
        else:
            change = "choose another port with --port or GATEWAY_PORT"
        raise OSError(
            exc.errno,
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}); "
            f"{change}",
        ) from exc
    sock.set_inheritable(True)
    return sock


def build_server(settings: Settings) -> GatewayServer:
    """Wire backend, runtime, application and uvicorn from the settings."""
    limit = raise_open_files_limit()
    logger.info(
        "starting with %s, open files limit %d",
        settings.loggable(),
        limit,
    )
    quiet_bad_requests()
    runtime = Runtime(settings, make_backend(settings))
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    config = uvicorn.Config(
        create_app(runtime),
        host=settings.host,
        port=settings.port,
        loop=loop,
        http=GatewayHttpProtocol,
        ws=WebSocketProtocol,
        lifespan="on",
        log_config=None,
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        # Publishers keep their HTTP connections between batches.
        timeout_keep_alive=30,
    )
    return GatewayServer(config, runtime)
