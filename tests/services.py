"""Outside services a test owns: Redis, MQTT brokers, a proxy that can go silent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from support import API_KEY, free_port, timeout


class RedisServer:
    """A redis-server of the test's own on a free port, keeping nothing on disk.

    Tests that stop or restart Redis use this, never the machine's own server.
    """

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout(10)
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def stop(self) -> None:
        """Kill the server (its data is gone: nothing is saved)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class SilentProxy:
    """A TCP proxy that can stop forwarding both ways while keeping sockets open.

    Once ``go_silent`` is called, no byte passes in either direction and no FIN or
    RST is sent: to both ends the peer looks like it vanished behind a firewall.
    Between ``drop_replies`` and ``pass_replies`` what the upstream sends back is
    thrown away, on every connection: requests still arrive, their answers are lost.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._replies_dropped = False
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        self._writers += [writer, up_writer]
        for source, sink, replies in (
            (reader, up_writer, False),
            (up_reader, writer, True),
        ):
            task = asyncio.create_task(self._pump(source, sink, replies))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, replies: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if replies and self._replies_dropped:
                    continue
                sink.write(data)
                await sink.drain()

    def drop_replies(self) -> None:
        """Throw away the upstream's answers from now on; requests still pass."""
        self._replies_dropped = True

    def pass_replies(self) -> None:
        """Forward the upstream's answers again."""
        self._replies_dropped = False

    def go_silent(self) -> None:
        """Stop forwarding; keep every socket open."""
        for task in list(self._pumps):
            task.cancel()

    async def close(self) -> None:
        self.go_silent()
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


#: The broker configuration shipped in ``deploy/mosquitto/``.
MOSQUITTO_DEPLOY = Path(__file__).parent.parent / "deploy" / "mosquitto"
MOSQUITTO = "/usr/sbin/mosquitto"


class BrokerProcess:
    """What the tests do to a broker process of their own, whichever broker."""

    process: subprocess.Popen[bytes] | None
    log_path: Path

    def stop(self) -> None:
        """Stop the broker with SIGTERM; it keeps its sessions for ``start``."""
        _terminate(self.process)
        self.process = None

    def freeze(self) -> None:
        """Stop the broker's process with SIGSTOP: it holds its sockets, silent."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen broker run again."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        """What the broker has logged so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")


class MosquittoServer(BrokerProcess):
    """A Mosquitto of the test's own on free loopback ports.

    Without ``users`` it lets anyone in. With ``users`` (name to password) it runs
    the configuration and ACL of ``deploy/mosquitto/`` with a password file made by
    ``mosquitto_passwd``, and a WebSocket listener on ``ws_port``. Persistence is
    on, in the test's directory, so that sessions and retained messages survive
    ``stop`` and ``start``. The machine's own broker on 1883 is never touched.
    """

    name = "mosquitto"

    def __init__(self, workdir: Path, users: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.ws_port = free_port()
        self.workdir = workdir / f"mosquitto-{self.port}"
        self.workdir.mkdir(parents=True)
        self.users = users
        self.config = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._write_config()

    def url(self, user: str | None = None) -> str:
        """The broker's URL, with the user's password when given."""
        if user is None:
            return f"mqtt://127.0.0.1:{self.port}"
        assert self.users is not None
        return f"mqtt://{user}:{self.users[user]}@127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        import getpass

        data = self.workdir / "data"
        data.mkdir()
        if self.users is None:
            lines = [
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {data}/",
            ]
        else:
            lines = self._deploy_config(data)
        # Run as root, Mosquitto would switch to the user "mosquitto", who cannot
        # read the test's files; as anyone else it ignores this line.
        lines += [
            f"user {getpass.getuser()}",
            f"log_dest file {self.log_path}",
            "log_type all",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def _deploy_config(self, data: Path) -> list[str]:
        """The shipped configuration, its ports and paths moved into the test's."""
        passwd = self.workdir / "passwd"
        assert self.users is not None
        for number, (user, password) in enumerate(self.users.items()):
            create = ["-c"] if number == 0 else []
            subprocess.run(
                ["mosquitto_passwd", *create, "-b", str(passwd), user, password],
                check=True,
            )
        passwd.chmod(0o600)
        replacements = {
            "listener 1883": f"listener {self.port} 127.0.0.1",
            "listener 9001": f"listener {self.ws_port} 127.0.0.1",
            "password_file /mosquitto/config/passwd": f"password_file {passwd}",
            "acl_file /mosquitto/config/acl": f"acl_file {MOSQUITTO_DEPLOY / 'acl'}",
            "persistence_location /mosquitto/data/": f"persistence_location {data}/",
        }
        lines = []
        for line in (MOSQUITTO_DEPLOY / "mosquitto.conf").read_text().splitlines():
            if line.startswith(("log_dest", "log_type")):
                continue
            lines.append(replacements.get(line, line))
        missing = set(replacements.values()) - set(lines)
        assert not missing, f"deploy/mosquitto/mosquitto.conf changed: {missing}"
        return lines

    def start(self) -> None:
        """Start the broker and wait until it accepts TCP connections."""
        import socket

        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout(10)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited early:\n{self.log()}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto on {self.port} did not start:\n{self.log()}")


class EmbeddedBrokerServer(BrokerProcess):
    """The gateway's embedded broker run on its own (``gateway broker``).

    It has the same face as ``MosquittoServer`` so that MQTT tests run against
    both: free loopback ports, ``url``, ``start``, ``stop``, ``log``. Sessions and
    retained messages persist in the test's directory across ``stop`` and
    ``start``. The gateway logs in as ``gateway`` with the tests' API key; other
    users do not exist, so ``url`` takes no user but that one.
    """

    name = "embedded"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.ws_port = free_port()
        self.workdir = workdir / f"embedded-broker-{self.port}"
        self.workdir.mkdir(parents=True)
        self.log_path = self.workdir / "broker.log"
        # The gateway's --mqtt-prefix, under which the public trees are open.
        self.prefix = ""
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str | None = None) -> str:
        """The URL with which the gateway publishes (the only account there is)."""
        assert user in (None, "gateway")
        return f"mqtt://gateway:{API_KEY}@127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the broker and wait until it says it listens."""
        env = dict(os.environ)
        env.update(
            {
                "GATEWAY_API_KEY": API_KEY,
                "GATEWAY_MQTT_PORT": str(self.port),
                "GATEWAY_MQTT_WS_PORT": str(self.ws_port),
                "GATEWAY_MQTT_DATA_DIR": str(self.workdir / "data"),
                "GATEWAY_MQTT_PREFIX": self.prefix,
            }
        )
        with open(self.log_path, "ab") as log:
            # Niced: on a two-core machine the broker's start-up (a second of
            # CPU) would otherwise be measured as the gateway's delay by the
            # tests that restart it under load.
            self.process = subprocess.Popen(
                ["nice", "-n", "5", sys.executable, "-m", "gateway", "broker"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout(20)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded broker exited early:\n{self.log()}")
            if "broker ready" in self.log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"embedded broker did not start:\n{self.log()}")


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    # A frozen process would not act on SIGTERM.
    process.send_signal(signal.SIGCONT)
    process.terminate()
    try:
        process.wait(timeout(10))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
