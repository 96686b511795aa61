"""A raw ``websockets`` fan-out server: the baseline the gateway is measured against.

It speaks the part of the gateway's protocol that the fan-out benchmark uses, with
``websockets`` 15's asyncio implementation on uvloop (the event loop the gateway
runs on too), and nothing else:

- ``/ws`` is for subscribers. A connection gets ``{"type":"welcome",...}``, may
  send ``{"op":"subscribe","topics":[...]}`` and gets ``{"type":"subscribed",...}``.
- ``/publish`` is for publishers. Each text message is what the gateway takes as
  a ``POST /events`` body (one event object or an array of them). Every event is
  stamped like the gateway's (``id``, per-topic ``offset``, ``publishedAt``),
  encoded once with orjson in the gateway's key order and handed to
  ``websockets.asyncio.server.broadcast`` with the topic's subscribers; then the
  publisher gets ``{"events":[{"id","topic","offset"},...]}``.

Why the publisher is a WebSocket and not HTTP: the ``websockets`` server reads no
request bodies, so an HTTP ``POST`` would need a second server library or a
hand-written HTTP parser in the baseline, and the benchmark would partly measure
that instead of ``broadcast()``. What matters for fan-out is the work per
subscriber: one publish costs the server one message read and one reply, against
one frame written per subscriber, so at thousands of subscribers the way events
come in is well under one percent of the work. Where it differs, it favours the
baseline: the gateway's HTTP ingress, with its authentication, validation and
history, is counted in the gateway's CPU time. Both servers answer only after the
fan-out was written, so the benchmark paces them the same way.

Compression is off, and the benchmark's client offers none: one encoded frame
could otherwise not serve every subscriber. Keepalive pings use the library's
defaults (every 20 s, 20 s to answer), as the gateway's do.

Run it with ``python -m clients.baseline_server --port 8765``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = ["BaselineServer", "main"]

logger = logging.getLogger(__name__)

SUBSCRIBE_PATH = "/ws"
PUBLISH_PATH = "/publish"
#: Answered with 200 once the server listens, as the gateway's is.
HEALTH_PATH = "/healthz"
#: Same as the gateway's listen backlog, so that bursts of handshakes are
#: queued alike.
_BACKLOG = 4096
_MAX_MESSAGE_BYTES = 1024 * 1024


class BaselineServer:
    """Topics, their subscribers and the two connection handlers.

    One instance serves every connection of the process; all of it runs on the
    event loop, so no lock is needed.
    """

    def __init__(self) -> None:
        # Topic name to the connections subscribed to it.
        self.subscribers: defaultdict[str, set[ServerConnection]] = defaultdict(set)
        # Topic name to the last offset given, as the gateway numbers events.
        self.last_offset: dict[str, int] = {}

    async def handle(self, connection: ServerConnection) -> None:
        """Route a new connection by the path of its upgrade request."""
        assert connection.request is not None
        if connection.request.path.partition("?")[0] == PUBLISH_PATH:
            await self._publisher(connection)
        else:
            await self._subscriber(connection)

    async def _subscriber(self, connection: ServerConnection) -> None:
        topics: set[str] = set()
        try:
            await connection.send(
                _text({"type": "welcome", "connectionId": uuid.uuid4().hex})
            )
            async for message in connection:
                await self._operation(connection, message, topics)
        except ConnectionClosed:
            # A subscriber that leaves is the normal end of its handler.
            pass
        finally:
            for topic in topics:
                self.subscribers[topic].discard(connection)

    async def _operation(
        self, connection: ServerConnection, message: str | bytes, topics: set[str]
    ) -> None:
        try:
            operation = orjson.loads(message)
            names = operation["topics"] if operation["op"] == "subscribe" else None
        except (orjson.JSONDecodeError, KeyError, TypeError):
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            await connection.send(_text({"type": "error", "code": "bad_request"}))
            return
        for name in names:
            self.subscribers[name].add(connection)
            topics.add(name)
        await connection.send(_text({"type": "subscribed", "topics": names}))

    async def _publisher(self, connection: ServerConnection) -> None:
        try:
            async for message in connection:
                acks = [self._publish(draft) for draft in _drafts(message)]
                await connection.send(_text({"events": acks}))
        except ConnectionClosed:
            # The publisher left; it holds no subscriptions to clean up.
            pass
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            logger.debug("closing a publisher that sent a bad message: %s", exc)
            await connection.close(1003, "bad publish message")

    def _publish(self, draft: dict[str, Any]) -> dict[str, Any]:
        """Stamp one event, broadcast it and return its acknowledgement."""
        topic = draft["topic"]
        offset = self.last_offset.get(topic, 0) + 1
        self.last_offset[topic] = offset
        event_id = uuid.uuid4().hex
        payload = {
            "type": "event",
            "topic": topic,
            "offset": offset,
            "id": event_id,
            "publishedAt": _iso_now(),
            "eventSource": draft["eventSource"],
            "eventType": draft["eventType"],
            "eventDetails": draft["eventDetails"],
        }
        # One str for every subscriber: broadcast() encodes it to UTF-8 once
        # and frames it for each connection.
        broadcast(self.subscribers.get(topic, ()), _text(payload))
        return {"id": event_id, "topic": topic, "offset": offset}


def _drafts(message: str | bytes) -> list[dict[str, Any]]:
    decoded = orjson.loads(message)
    drafts = decoded if isinstance(decoded, list) else [decoded]
    if not all(isinstance(draft, dict) for draft in drafts):
        raise TypeError("a publish message holds an event object or an array")
    return drafts


def _text(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def _iso_now() -> str:
    stamp = datetime.fromtimestamp(time.time(), UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _only_known_paths(
    connection: ServerConnection, request: Request
) -> Response | None:
    """Let the WebSocket paths through; answer a health check; refuse the rest."""
    path = request.path.partition("?")[0]
    if path in (SUBSCRIBE_PATH, PUBLISH_PATH):
        return None
    if path == HEALTH_PATH:
        return connection.respond(200, "ok\n")
    return connection.respond(404, "use /ws or /publish\n")


async def serve_until_stopped(host: str, port: int) -> None:
    """Serve on ``host:port`` until SIGTERM or SIGINT."""
    baseline = BaselineServer()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        baseline.handle,
        host,
        port,
        process_request=_only_known_paths,
        compression=None,
        max_size=_MAX_MESSAGE_BYTES,
        backlog=_BACKLOG,
    ):
        logger.info("baseline server listening on %s:%d", host, port)
        await stop


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until stopped."""
    parser = argparse.ArgumentParser(
        prog="python -m clients.baseline_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8765, help="TCP port")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="lowest level logged",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    uvloop.run(serve_until_stopped(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
