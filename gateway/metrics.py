"""Prometheus metrics of one gateway process, served at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    """Every metric the gateway exports, on a registry of its own.

    A registry per instance keeps two gateways in one process (as in tests) apart.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.connections = Gauge(
            "gateway_connections",
            "Open WebSocket connections on this replica.",
            registry=registry,
        )
        self.subscriptions = Gauge(
            "gateway_subscriptions",
            "Subscriptions (connection and topic filter pairs) on this replica.",
            registry=registry,
        )
        self.backlog = Gauge(
            "gateway_fanout_backlog",
            "Events accepted on this replica and not yet written to subscribers.",
            registry=registry,
        )
        self.events_in = Counter(
            "gateway_events_in",
            "Events accepted by the publish API of this replica.",
            registry=registry,
        )
        self.deliveries = Counter(
            "gateway_deliveries",
            "Event frames handed to local subscribers' sockets.",
            registry=registry,
        )
        self.slow_consumer_closes = Counter(
            "gateway_slow_consumer_closes",
            "Connections closed because their outbound buffer passed its cap.",
            registry=registry,
        )
        self.closes = Counter(
            "gateway_closes",
            "WebSocket connections ended, by close code (1006: aborted).",
            ["code"],
            registry=registry,
        )
        self.client_errors = Counter(
            "gateway_client_errors",
            "Client mistakes answered with an error, by error code.",
            ["code"],
            registry=registry,
        )
        self.publish_keys = Gauge(
            "gateway_publish_keys",
            "Publish keys of the keys file in force (the operator's not counted).",
            registry=registry,
        )
        self.refused_connections = Counter(
            "gateway_refused_connections",
            "WebSocket upgrades refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.mqtt_published = Counter(
            "gateway_mqtt_published",
            "Events this replica published to the MQTT broker (acknowledged for "
            "QoS 1 and 2).",
            registry=registry,
        )
        self.mqtt_failures = Counter(
            "gateway_mqtt_failures",
            "MQTT publish attempts that failed; QoS 1 and 2 events are retried.",
            registry=registry,
        )
        self.mqtt_dropped = Counter(
            "gateway_mqtt_dropped",
            "Accepted events never published to the broker: QoS 0 while it was "
            "away, the oldest when the buffer was full, the rest at shutdown.",
            registry=registry,
        )
        self.mqtt_buffered = Gauge(
            "gateway_mqtt_buffered",
            "Accepted events waiting to be published to the MQTT broker.",
            registry=registry,
        )
        self.mqtt_connected = Gauge(
            "gateway_mqtt_connected",
            "1 while the MQTT bridge is connected to the broker, else 0.",
            registry=registry,
        )
        self.mqtt_reconnects = Counter(
            "gateway_mqtt_reconnects",
            "Connections to the MQTT broker made again after one was lost.",
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "gateway_delivery_latency_seconds",
            "From an event's publish time until its frame was handed to the last "
            "matching local subscriber's socket.",
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
            ),
            registry=registry,
        )
