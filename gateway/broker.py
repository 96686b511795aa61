"""The embedded MQTT broker, for a gateway started with no broker URL.

``gateway serve`` and ``gateway demo`` with no ``--mqtt-url`` start an amqtt broker
in a child process: a TCP listener for devices and a WebSocket listener for
browsers. A child process keeps the broker's fan-out off the gateway's event loop
(the two share no CPU-bound work, so on two cores they run side by side) and a
broker failure off the gateway's process.

The broker's rules are the production ones of ``deploy/mosquitto/``, kept small:

- Only the gateway publishes. It logs in as ``gateway`` with the gateway's API key
  as password; a publish from anyone else is dropped, as Mosquitto drops it.
- Anyone may subscribe, without logging in, to the public topic trees and to the
  topic of one job by its full id: a wildcard in place of a job id would reveal
  the ids, which are the jobs' valet keys.
- A login with any other name or a wrong password is refused.

``gateway broker`` runs the same broker on its own, for tests that stop and
restart a broker and for users who want one in a separate terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

__all__ = [
    "PUBLISHER",
    "BrokerError",
    "EmbeddedBroker",
    "allowed_to_subscribe",
    "run_broker",
]

logger = logging.getLogger(__name__)

#: The only account that may publish: the gateway's own.
PUBLISHER = "gateway"
#: Topic trees every client may read.
PUBLIC_TREES = ("stocks", "fixtures", "teams")
#: What the child prints on its standard output once both listeners are up.
_READY_LINE = "broker ready"
#: Seconds the gateway gives its broker to start and, later, to stop.
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0


class BrokerError(Exception):
    """The embedded broker could not start; the message says why."""


def allowed_to_subscribe(topic_filter: str, prefix: str = "") -> bool:
    """Whether a client other than the gateway may subscribe to ``topic_filter``.

    The public trees are open to any filter within them. Job topics are open
    only by their full id: ``jobs/<id>``, with no wildcard for the id. With a
    ``prefix`` (the gateway's ``--mqtt-prefix``) the trees are under it.
    """
    if not topic_filter.startswith(prefix):
        return False
    levels = topic_filter[len(prefix) :].split("/")
    if levels[0] in PUBLIC_TREES:
        return True
    return (
        levels[0] == "jobs"
        and len(levels) == 2
        and levels[1] not in ("", "+", "#")
        and "+" not in levels[1]
        and "#" not in levels[1]
    )


class PublisherLogin(BaseAuthPlugin):  # type: ignore[misc]
    """Lets anonymous clients in, and the gateway with its password; no one else."""

    @dataclass
    class Config:
        """The gateway's password (its API key)."""

        password: str = ""

    async def authenticate(self, *, session: Any) -> bool:
        """Refuse a login under any name but the gateway's, or a wrong password."""
        username = session.username
        if username is None:
            return True
        password = session.password or ""
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        expected: str = self.context.config.password
        # Constant time, as for the HTTP API key.
        good = hmac.compare_digest(password.encode(), expected.encode())
        if username == PUBLISHER and expected and good:
            return True
        logger.warning("refused MQTT login as %r", username)
        return False


class TopicRules(BaseTopicPlugin):  # type: ignore[misc]
    """Only the gateway publishes; others read the public trees and single jobs."""

    @dataclass
    class Config:
        """What the gateway puts before every topic."""

        prefix: str = ""

    async def topic_filtering(
        self,
        *,
        session: Any = None,
        topic: str | None = None,
        action: Any = None,
    ) -> bool:
        """Allow or refuse one publish, subscription or delivery."""
        if session is not None and session.username == PUBLISHER:
            return True
        if action == Action.PUBLISH:
            logger.info("dropped a publish to %r from a client that may not", topic)
            return False
        if action == Action.SUBSCRIBE:
            prefix: str = self.context.config.prefix
            allowed = topic is not None and allowed_to_subscribe(topic, prefix)
            if not allowed:
                logger.info("refused a subscription to %r", topic)
            return allowed
        return True


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker, with retained messages sent only to their subscribers.

    amqtt 0.12.1, on every connection, sends the retained messages of every
    filter that any session subscribes to, to the client that connects, whether
    or not that client subscribes to them: a late subscriber got a retained
    price twice, and any client got the retained state of jobs it never asked
    for. This sends them only when the session holds the subscription.
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        holders = self._subscriptions.get(subscription[0], ())
        if any(holder.client_id == session.client_id for holder, _ in holders):
            await super()._publish_retained_messages_for_subscription(
                subscription, session
            )


def broker_config(
    host: str,
    port: int,
    ws_port: int,
    password: str,
    data_dir: Path | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """The amqtt configuration of the embedded broker.

    With ``data_dir``, persistent sessions (clean session off), their
    subscriptions and retained messages are kept in a SQLite file there and
    restored when the broker starts again.
    """
    plugins: dict[str, Any] = {
        f"{__name__}.PublisherLogin": {"password": password},
        f"{__name__}.TopicRules": {"prefix": prefix},
    }
    if data_dir is not None:
        plugins["amqtt.contrib.persistence.SessionDBPlugin"] = {
            "connection": f"sqlite+aiosqlite:///{data_dir.resolve() / 'broker.db'}",
            "clear_on_shutdown": False,
        }
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}"},
            "ws": {"type": "ws", "bind": f"{host}:{ws_port}"},
        },
        "plugins": plugins,
    }


async def run_broker(
    host: str,
    port: int,
    ws_port: int,
    password: str,
    *,
    ready: Callable[[], None],
    stop: asyncio.Event,
    data_dir: Path | None = None,
    prefix: str = "",
) -> None:
    """Serve MQTT on ``port`` and MQTT over WebSocket on ``ws_port`` until ``stop``.

    ``ready`` is called once both listeners accept connections.

    Raises:
        BrokerError: a listener could not be opened, such as a port in use.
    """
    # amqtt and the libraries under it log every connection and state change
    # at INFO; the gateway's log keeps their warnings.
    level = max(logging.WARNING, logging.getLogger().getEffectiveLevel())
    for name in ("amqtt", "transitions", "websockets", "aiosqlite", "sqlalchemy"):
        logging.getLogger(name).setLevel(level)
    broker = _Broker(broker_config(host, port, ws_port, password, data_dir, prefix))
    # amqtt logs a failed start with a traceback at ERROR; the gateway says
    # instead, in one line, which port failed and which flag moves it.
    amqtt_logger = logging.getLogger("amqtt.broker")
    amqtt_logger.disabled = True
    try:
        await broker.start()
    except Exception as exc:
        raise BrokerError(_start_failure(exc, port, ws_port)) from exc
    finally:
        amqtt_logger.disabled = False
    logger.info(
        "embedded MQTT broker on mqtt://%s:%d and ws://%s:%d", host, port, host, ws_port
    )
    ready()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def _start_failure(exc: BaseException, port: int, ws_port: int) -> str:
    """Say which port could not be opened and which flag moves it."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    text = str(cause or exc)
    if isinstance(cause, OSError) and f":{ws_port}" in text:
        return (
            f"MQTT WebSocket port {ws_port}: {cause.strerror} (change --mqtt-ws-port)"
        )
    if isinstance(cause, OSError):
        return f"MQTT port {port}: {cause.strerror} (change --mqtt-port)"
    return f"the embedded MQTT broker failed to start: {text}"


class EmbeddedBroker:
    """The gateway's side of a broker running in a child process.

    The child runs ``gateway broker``; its standard input is a pipe it reads to
    its end, so it stops when the gateway closes the pipe, and also when the
    gateway dies without closing it (the kernel closes it then). It runs in a
    session of its own so that a Ctrl-C meant for the gateway does not stop the
    broker before the gateway has published what it still holds.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ws_port: int,
        password: str,
        data_dir: str | None = None,
        prefix: str = "",
    ) -> None:
        """Describe the broker to start; nothing runs before ``start``."""
        self.host = host
        self.port = port
        self.ws_port = ws_port
        self.data_dir = data_dir
        self.prefix = prefix
        self._password = password
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches the broker."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def url(self) -> str:
        """The broker URL with which the gateway logs in to publish."""
        password = quote(self._password, safe="")
        return f"mqtt://{PUBLISHER}:{password}@{self.connect_host}:{self.port}"

    def start(self) -> None:
        """Start the child and wait until it listens.

        Raises:
            BrokerError: the child exited or did not get ready in time; the
                message carries its reason, such as a port in use.
        """
        env = dict(os.environ)
        env["GATEWAY_API_KEY"] = self._password
        command = [
            sys.executable,
            "-m",
            "gateway",
            "broker",
            "--host",
            self.host,
            "--mqtt-port",
            str(self.port),
            "--mqtt-ws-port",
            str(self.ws_port),
            "--until-stdin-closes",
        ]
        if self.data_dir:
            command += ["--mqtt-data-dir", self.data_dir]
        if self.prefix:
            command += ["--mqtt-prefix", self.prefix]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self._process = process
        assert process.stdout is not None
        line = _read_line(process.stdout, _START_TIMEOUT)
        if line.strip() == _READY_LINE:
            return
        self.stop()
        if process.returncode not in (None, 0):
            raise BrokerError(
                line.strip()
                or f"the embedded MQTT broker exited ({process.returncode})"
            )
        raise BrokerError(
            f"the embedded MQTT broker did not start within {_START_TIMEOUT:.0f} s"
        )

    def stop(self) -> None:
        """Close the child's input, wait for it to stop, kill it if it will not."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("embedded MQTT broker did not stop; killing it")
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _read_line(stream: IO[bytes], seconds: float) -> str:
    """One line from the child's standard output, or '' at its end or timeout."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                return stream.readline().decode("utf-8", "replace")
    return ""


def serve_broker(
    host: str,
    port: int,
    ws_port: int,
    password: str,
    *,
    until_stdin_closes: bool,
    data_dir: Path | None = None,
    prefix: str = "",
) -> None:
    """Run the broker in this process until SIGTERM, SIGINT or, if asked, stdin's end.

    On success the line ``broker ready`` goes to standard output; on failure the
    reason goes there instead, for the gateway that started the process to show.

    Raises:
        BrokerError: the broker could not start.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if until_stdin_closes:
            loop.add_reader(sys.stdin.fileno(), _on_stdin, stop)

        def ready() -> None:
            sys.stdout.write(f"{_READY_LINE}\n")
            sys.stdout.flush()

        await run_broker(
            host,
            port,
            ws_port,
            password,
            ready=ready,
            stop=stop,
            data_dir=data_dir,
            prefix=prefix,
        )

    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(main())
    except BrokerError as exc:
        sys.stdout.write(f"{exc}\n")
        sys.stdout.flush()
        raise


def _on_stdin(stop: asyncio.Event) -> None:
    # Anything written is ignored; the end of the pipe means the gateway is gone.
    if not os.read(sys.stdin.fileno(), 4096):
        asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
        stop.set()
