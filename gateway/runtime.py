"""The running gateway: settings, state backend, router and metrics, wired once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

from gateway.config import Settings
from gateway.errors import Unavailable
from gateway.events.envelope import Draft, Event
from gateway.fanout.router import Router
from gateway.metrics import Metrics
from gateway.security.access import SubscriberAccess
from gateway.security.keys import KeyRing
from gateway.security.limits import ConnectionLimits
from gateway.state.base import Once, StateBackend
from gateway.transports.mqtt import MqttBridge, parse_qos_rules

__all__ = ["Runtime"]

logger = logging.getLogger(__name__)


class Runtime:
    """Everything a request or a connection needs from the process it runs in.

    One instance lives for the life of the Starlette application; the HTTP
    handlers find it on ``request.state`` and the WebSocket transport in the
    lifespan state uvicorn hands to every connection.
    """

    def __init__(self, settings: Settings, backend: StateBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.router = Router()
        self.metrics = Metrics()
        # Set by the first SIGTERM: /readyz answers 503 and new WebSocket
        # handshakes are refused while open connections are closed with 1001.
        self.draining = False
        # Background work that belongs to no request, kept so that it is neither
        # garbage collected mid-flight nor left running at shutdown.
        self._tasks: set[asyncio.Task[Any]] = set()
        # Events stored but not yet fanned out, oldest first. Ingest appends and
        # answers at once; one task writes them to subscribers in order, so a
        # publisher never waits for (or is starved by) a large fan-out.
        self._backlog: deque[Event] = deque()
        self._backlog_ready = asyncio.Event()
        self._fanout_task: asyncio.Task[None] | None = None
        # Reads the keys file again when it changes; see KeyRing.watch.
        self._keys_task: asyncio.Task[None] | None = None
        # Whether publishes are being refused for a full backlog (logged once).
        self._backlog_full = False
        self.metrics.backlog.set_function(lambda: len(self._backlog))
        # Derived from the routing table when scraped, so it cannot drift.
        self.metrics.subscriptions.set_function(lambda: self.router.subscription_count)
        backend.set_listener(self.on_event)
        # Tokens and read rights of WebSocket subscribers.
        self.access = SubscriberAccess.from_settings(settings)
        # Publish keys and webhook secrets; the keys file is watched for changes.
        self.keys = KeyRing.from_settings(settings)
        self.metrics.publish_keys.set_function(lambda: self.keys.publish_key_count)
        # Origins, connection counts and connect rates of WebSocket clients.
        self.limits = ConnectionLimits.from_settings(settings)
        # Publishes the events this replica accepts to the broker; None when no
        # broker URL is set.
        self.mqtt = _make_bridge(settings, self.metrics)

    async def start(self) -> None:
        """Connect the backend and start the fan-out task."""
        await self.backend.start()
        self._fanout_task = asyncio.get_running_loop().create_task(self._fan_out())
        # Runs until close, so it is not among the tasks close waits for.
        self._keys_task = asyncio.get_running_loop().create_task(self.keys.watch())
        logger.info("state backend %s ready", self.backend.name)
        if self.mqtt is not None:
            # Connecting runs in the background: the gateway serves WebSocket
            # clients whether or not the broker is there.
            self.mqtt.start()

    async def close(self) -> None:
        """Finish background work and release the backend."""
        if self._fanout_task is not None:
            self._fanout_task.cancel()
        if self._keys_task is not None:
            self._keys_task.cancel()
        if self.mqtt is not None:
            await self.mqtt.close(flush_within=self.settings.close_timeout)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.close_timeout)
        for task in self._tasks:
            task.cancel()
        await self.backend.close()

    def spawn(self, coroutine: Coroutine[Any, Any, Any], what: str) -> None:
        """Run a coroutine in the background; log its failure with a traceback."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                logger.error("%s failed", what, exc_info=task.exception())

        task.add_done_callback(done)

    async def publish(
        self, drafts: Sequence[Draft], *, once: Once | None = None
    ) -> list[Event]:
        """Stamp, store and deliver a batch of events; see ``StateBackend.publish``.

        Raises:
            AlreadyPublished: ``once`` names a key used before; nothing stored.
            Unavailable: the fan-out backlog is full or the backend is down;
                nothing was stored (unless the backend's answer was lost).
        """
        # A batch that would take the backlog past its cap waits for room, but
        # one into an empty backlog is taken whatever its size, or a batch over
        # the cap could never be published.
        waiting = len(self._backlog)
        if waiting and waiting + len(drafts) > self.settings.max_backlog:
            if not self._backlog_full:
                self._backlog_full = True
                logger.warning(
                    "fan-out backlog full (%d events): refusing publishes",
                    len(self._backlog),
                )
            raise Unavailable(
                f"{len(self._backlog)} events wait for delivery; try again shortly"
            )
        self._backlog_full = False
        events = await self.backend.publish(
            drafts, max_bytes=self.settings.max_event_bytes, once=once
        )
        self.metrics.events_in.inc(len(events))
        # Only the replica that accepted an event publishes it to the broker,
        # so MQTT subscribers get it once however many replicas run.
        if self.mqtt is not None:
            self.mqtt.submit(events)
        return events

    def on_event(self, event: Event) -> None:
        """Queue one event for this replica's subscribers (the backend's listener)."""
        self._backlog.append(event)
        self._backlog_ready.set()

    async def _fan_out(self) -> None:
        """Deliver queued events in order, yielding to the loop between events."""
        backlog = self._backlog
        while True:
            await self._backlog_ready.wait()
            self._backlog_ready.clear()
            while backlog:
                event = backlog.popleft()
                try:
                    self._deliver(event)
                except Exception:
                    # A bug in one delivery must not stop every later one.
                    logger.exception("delivering %s failed", event.id)
                # Ingest, reads and keepalives run between two events.
                await asyncio.sleep(0)

    def _deliver(self, event: Event) -> None:
        delivered = self.router.deliver(event)
        if delivered:
            self.metrics.deliveries.inc(delivered)
            self.metrics.delivery_latency.observe(time.time() - event.published_at)


def _make_bridge(settings: Settings, metrics: Metrics) -> MqttBridge | None:
    if settings.mqtt_url is None:
        return None
    return MqttBridge(
        settings.mqtt_url,
        metrics=metrics,
        client_id=settings.mqtt_client_id or f"gateway-{settings.replica}",
        prefix=settings.mqtt_prefix,
        buffer=settings.mqtt_buffer,
        qos_rules=parse_qos_rules(settings.mqtt_qos),
    )
