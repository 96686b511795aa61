"""Settings: one object built once at start from flags and ``GATEWAY_`` variables.

Every setting has a flag and an environment variable with the same name: the flag
``--max-frame-bytes`` and the variable ``GATEWAY_MAX_FRAME_BYTES``. A flag wins over
the variable, which wins over the default. The README's settings table lists them.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ENV_PREFIX",
    "Settings",
    "SettingsError",
    "flag_name",
    "load_settings",
    "without_credentials",
]

ENV_PREFIX = "GATEWAY_"


def _default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Everything the gateway can be told at start; sizes in bytes, times in seconds."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    api_key: SecretStr | None = Field(
        None,
        description="Bearer key for POST /events; a random one is made and "
        "printed at start when unset.",
    )
    keys_file: str | None = Field(
        None,
        description="TOML file of scoped publish keys and webhook secrets, read "
        "again whenever it changes (docs/security.md); only --api-key when unset.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged."
    )
    log_format: Literal["plain", "json"] = Field(
        "plain", description="Log line format."
    )
    replica: str = Field(
        default_factory=_default_replica,
        description="Name of this gateway process in logs and the registry "
        "(default: host name and process id).",
    )
    redis_url: str | None = Field(
        None,
        description="Redis to share state with other replicas, such as "
        "redis://127.0.0.1:6379/0; in-memory state when unset.",
    )
    redis_prefix: str = Field(
        "gateway:",
        min_length=1,
        max_length=64,
        description="Put before every Redis key and channel name.",
    )
    record_ttl: float = Field(
        30.0,
        ge=1.0,
        description="Seconds a connection record lives in Redis unless its replica "
        "refreshes it (every third of this).",
    )
    mqtt_url: str | None = Field(
        None,
        description="MQTT broker to publish every accepted event to, such as "
        "mqtt://user:password@127.0.0.1:1883 (mqtts:// for TLS); no MQTT when unset.",
    )
    mqtt_broker: Literal["embedded", "none"] = Field(
        "embedded",
        description="With no --mqtt-url: embedded starts an MQTT broker beside "
        "the gateway (TCP on --mqtt-port, WebSocket on --mqtt-ws-port); none "
        "turns MQTT off.",
    )
    mqtt_port: int = Field(
        1883, ge=1, le=65535, description="TCP port of the embedded MQTT broker."
    )
    mqtt_ws_port: int = Field(
        9001,
        ge=1,
        le=65535,
        description="MQTT over WebSocket port of the embedded broker, for browsers.",
    )
    mqtt_data_dir: str | None = Field(
        None,
        description="Folder where the embedded broker keeps persistent sessions, "
        "their subscriptions and retained messages across its restarts; in "
        "memory only when unset.",
    )
    mqtt_prefix: str = Field(
        "",
        max_length=64,
        description="Put before every topic published to the broker, as is "
        "(gw/ gives gw/stocks/AAPL).",
    )
    mqtt_buffer: int = Field(
        10_000,
        ge=1,
        description="Events kept for the broker while it is away or slow; past "
        "this the oldest is dropped and counted.",
    )
    mqtt_client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="MQTT client identifier, unique per replica "
        "(default: gateway- and the replica name).",
    )
    mqtt_qos: str = Field(
        "stocks/#=0r,fixtures/#=1,teams/#=1,jobs/#=1r",
        description="QoS and retain flag per topic filter, first match wins: "
        "filter=QOS, with r after the QoS for retained; others get QoS 0.",
    )
    jwt_secret: SecretStr | None = Field(
        None,
        description="Shared secret of HS256 subscriber tokens (at least 32 "
        "characters); no HS256 tokens when unset.",
    )
    jwt_public_keys: str | None = Field(
        None,
        description="PEM file of the public keys (RSA or EC) that check RS256 and "
        "ES256 subscriber tokens; several keys allow rotation.",
    )
    anonymous_read: str = Field(
        "#",
        description="Topic filters a WebSocket client without a token may read, "
        "comma-separated; empty refuses clients without a token. Job topics need "
        "their full id or a right in the jobs tree.",
    )
    allowed_origins: str = Field(
        "",
        description="Origins (scheme://host[:port], comma-separated) whose pages "
        "may open WebSocket connections; empty or * allows any. Requests without "
        "an Origin header (not from a browser) are not checked.",
    )
    max_connections: int = Field(
        10_000, ge=1, description="Most open WebSocket connections on this replica."
    )
    max_connections_per_address: int = Field(
        0,
        ge=0,
        description="Most open WebSocket connections from one client address; 0: "
        "no limit (behind a load balancer every client has its address).",
    )
    max_connects_per_second: float = Field(
        0.0,
        ge=0,
        description="New WebSocket connections per second from one client address, "
        "with bursts of twice that; 0: no limit.",
    )
    max_frame_bytes: int = Field(
        65536,
        ge=1024,
        description="Largest WebSocket message a client may send; larger ones "
        "close the connection with 1009.",
    )
    max_header_bytes: int = Field(
        65536,
        ge=4096,
        description="Largest HTTP request line and headers, WebSocket upgrades "
        "included; larger ones get 431 before they are read whole.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has from the first byte of a request to the "
        "end of its headers; slower ones get 408.",
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest POST /events body (413 above)."
    )
    max_event_bytes: int = Field(
        65536, ge=256, description="Largest encoded event (413 above)."
    )
    max_batch: int = Field(
        1000, ge=1, description="Most events in one POST /events array."
    )
    max_subscriptions: int = Field(
        100, ge=1, description="Most topic filters one connection may hold."
    )
    max_topic_length: int = Field(
        256, ge=8, le=65535, description="Longest topic name or filter, in characters."
    )
    max_topic_depth: int = Field(
        8, ge=1, le=64, description="Most levels in a topic name or filter."
    )
    max_messages_per_second: float = Field(
        50.0,
        gt=0,
        description="Messages per second a client may send over WebSocket, with "
        "bursts of twice that; faster clients are closed with 1008.",
    )
    max_buffer_bytes: int = Field(
        1024 * 1024,
        ge=4096,
        description="Outbound bytes queued for one slow client before it is "
        "closed with 1013.",
    )
    idempotency_ttl: float = Field(
        86400.0,
        ge=1.0,
        description="Seconds an Idempotency-Key of POST /events is remembered, so "
        "that a retried publish is answered with its first events rather than "
        "stored again.",
    )
    history_size: int = Field(1000, ge=1, description="Events kept per topic.")
    max_backlog: int = Field(
        10_000,
        ge=1,
        description="Events waiting for fan-out on this replica before the "
        "publish API answers 503.",
    )
    ping_interval: float = Field(
        20.0,
        gt=0,
        description="Seconds between keepalive pings; a peer that does not answer "
        "within the same time is dropped.",
    )
    drain_delay: float = Field(
        1.0,
        ge=0,
        description="Seconds between SIGTERM and closing the listener, while "
        "/readyz answers 503 so that a load balancer stops sending clients.",
    )
    close_timeout: float = Field(
        2.0,
        gt=0,
        description="Seconds to wait for a client's close reply before aborting.",
    )
    shutdown_timeout: float = Field(
        8.0,
        gt=0,
        description="Seconds SIGTERM waits for clients to leave before aborting.",
    )

    # Jobs and polling
    job_workers: int = Field(
        4,
        ge=0,
        le=1000,
        description="Jobs this process runs at once: gateway serve runs them in "
        "process (0: none, for Redis deployments with gateway worker processes), "
        "gateway worker with this concurrency.",
    )
    job_ttl: float = Field(
        86400.0,
        ge=1.0,
        description="Seconds a finished job's record is kept (an unfinished one: "
        "after its last change, in Redis).",
    )
    job_claim_after: float = Field(
        30.0,
        ge=0.5,
        description="Seconds a job's worker may stay silent before another worker "
        "takes the job over; its lease lasts half of this.",
    )
    job_kinds: str = Field(
        "",
        description="More job kinds, as comma-separated module:attribute names of "
        "JobKind classes (besides the gateway.jobs entry points).",
    )
    poll_interval: int = Field(
        1,
        ge=1,
        le=3600,
        description="Seconds a polling client is told to wait between requests "
        "(Retry-After).",
    )

    # Webhooks
    webhook_secret: SecretStr | None = Field(
        None,
        description="Shared secret that signs POST /webhooks/fixtures deliveries "
        "(HMAC-SHA256); the route answers 503 when unset; gateway demo makes one.",
    )
    webhook_tolerance: float = Field(
        300.0,
        ge=1.0,
        description="Seconds a webhook's signed timestamp may differ from the "
        "gateway's clock before the delivery is refused with 401.",
    )
    webhook_dedupe_ttl: float = Field(
        86400.0,
        ge=1.0,
        description="Seconds a webhook event id is remembered, so that a repeated "
        "delivery of it is acknowledged without being published again.",
    )

    # Browser page
    demo_page_jobs: bool = Field(
        False,
        description="Let the browser page start demo db-refresh jobs without the "
        "API key (POST /demo/jobs); on by default in gateway demo only.",
    )
    mqtt_public_ws_url: str | None = Field(
        None,
        description="MQTT over WebSocket address the browser page connects to, "
        "such as wss://mqtt.example.com/mqtt; {host} stands for the host the page "
        "was loaded from. With the embedded broker it defaults to "
        "ws://{host}:<--mqtt-ws-port>/mqtt; otherwise the page's MQTT column is off.",
    )

    def loggable(self) -> dict[str, Any]:
        """The settings without secrets: no API key, no password in a URL."""
        values = self.model_dump(exclude={"api_key", "webhook_secret", "jwt_secret"})
        for field in ("redis_url", "mqtt_url"):
            if values[field]:
                values[field] = without_credentials(values[field])
        return values

    @field_validator("api_key")
    @classmethod
    def _api_key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 8:
            raise ValueError("an API key needs at least 8 characters")
        return value

    @field_validator("anonymous_read")
    @classmethod
    def _anonymous_read_filters(cls, value: str) -> str:
        from gateway.errors import BadTopic
        from gateway.events.topics import validate_filter

        for topic_filter in (f.strip() for f in value.split(",")):
            if topic_filter:
                try:
                    validate_filter(topic_filter)
                except BadTopic as exc:
                    raise ValueError(str(exc)) from None
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins_valid(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",")):
            if origin and origin != "*" and not _ORIGIN.fullmatch(origin.rstrip("/")):
                raise ValueError(
                    f"{origin!r} is not an origin such as https://example.com:8443"
                )
        return value

    @field_validator("keys_file")
    @classmethod
    def _keys_file_valid(cls, value: str | None) -> str | None:
        if value is not None:
            from gateway.security.keys import load_keys_file

            load_keys_file(value)
        return value

    @field_validator("jwt_public_keys")
    @classmethod
    def _public_keys_readable(cls, value: str | None) -> str | None:
        if value is not None:
            from gateway.security.tokens import TokenVerifier

            TokenVerifier(None, value)
        return value

    @field_validator("mqtt_data_dir")
    @classmethod
    def _data_dir_writable(cls, value: str | None) -> str | None:
        # Checked, not made: the broker makes it when it starts.
        if value is not None:
            folder = Path(value).absolute()
            existing = next(p for p in (folder, *folder.parents) if p.exists())
            if not existing.is_dir():
                raise ValueError(f"{existing} is not a folder")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ValueError(f"{existing} is not writable")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("an HS256 secret needs at least 32 characters")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("a webhook secret needs at least 16 characters")
        return value

    @field_validator("mqtt_public_ws_url")
    @classmethod
    def _mqtt_public_ws_url_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("ws://", "wss://")):
            raise ValueError("expected a URL starting with ws:// or wss://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_REDIS_SCHEMES):
            raise ValueError(f"expected a URL starting with one of {_REDIS_SCHEMES}")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url_valid(cls, value: str | None) -> str | None:
        if value is not None:
            from gateway.transports.mqtt import parse_broker_url

            parse_broker_url(value)
        return value

    @field_validator("mqtt_prefix")
    @classmethod
    def _mqtt_prefix_plain(cls, value: str) -> str:
        if any(char in value for char in "+#\0") or value.startswith("$"):
            raise ValueError("a prefix may not hold +, # or NUL, nor start with $")
        return value

    @field_validator("mqtt_qos")
    @classmethod
    def _mqtt_qos_rules(cls, value: str) -> str:
        from gateway.transports.mqtt import parse_qos_rules

        parse_qos_rules(value)
        return value

    @field_validator("job_kinds")
    @classmethod
    def _job_kinds_importable(cls, value: str) -> str:
        from gateway.jobs.kinds import named_kinds

        named_kinds(value)
        return value


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: What a browser sends as Origin: a scheme, a host and maybe a port, nothing else.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s@]+")


def without_credentials(url: str) -> str:
    """``url`` with any user name and password taken out, for logs."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


class SettingsError(ValueError):
    """A setting is invalid; the message names its flag and variable."""


def flag_name(field: str) -> str:
    """The command-line flag of a settings field, such as ``--api-key``."""
    return "--" + field.replace("_", "-")


def load_settings(**given: Any) -> Settings:
    """Build the settings from flags given and the environment.

    Args:
        given: values from flags; ``None`` means the flag was not given.

    Raises:
        SettingsError: a value is invalid; the message names flag and variable.
    """
    values = {name: value for name, value in given.items() if value is not None}
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(
                f"{flag_name(field)} / {ENV_PREFIX}{field.upper()}: {error['msg']}"
            )
        raise SettingsError("; ".join(problems)) from None
