"""The ``gateway`` command: serve, demo and the fan-out benchmark."""

from __future__ import annotations

import secrets
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from pydantic import SecretStr

from gateway.config import (
    ENV_PREFIX,
    Settings,
    SettingsError,
    flag_name,
    load_settings,
    without_credentials,
)
from gateway.logs import configure_logging

if typing.TYPE_CHECKING:
    from gateway.broker import EmbeddedBroker

__all__ = ["main"]


def _click_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if args:
        return _click_type(args[0])
    if annotation in (int, float):
        return annotation
    return str


def settings_options(
    *only: str,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one flag per setting (or per setting named in ``only``).

    Each flag reads its ``GATEWAY_`` variable as well.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(only or tuple(Settings.model_fields)):
            command = _setting_option(name)(command)
        return command

    return decorate


def _setting_option(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    field = Settings.model_fields[name]
    return click.option(
        flag_name(name),
        name,
        type=_click_type(field.annotation),
        default=None,
        help=f"{field.description} [env {ENV_PREFIX}{name.upper()}; "
        f"default {_default_text(name)}]",
    )


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return "computed"
    return "unset" if field.default is None else str(field.default)


def _settings(given: dict[str, Any]) -> Settings:
    # Flags take precedence; pydantic-settings fills the rest from GATEWAY_
    # variables, then from defaults.
    try:
        settings = load_settings(**given)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    if settings.api_key is None:
        settings = settings.model_copy(
            update={"api_key": SecretStr(secrets.token_urlsafe(24))}
        )
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _banner(settings: Settings, title: str, broker: EmbeddedBroker | None) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"{host}:{settings.port}"
    key = settings.api_key.get_secret_value() if settings.api_key else ""
    if broker is not None:
        mqtt = (
            f"mqtt://{host}:{broker.port}  ws://{host}:{broker.ws_port}  "
            "(embedded broker; subscribe only)"
        )
    elif settings.mqtt_url:
        mqtt = f"{without_credentials(settings.mqtt_url)}  (publishing to it)"
    else:
        mqtt = "off"
    return "\n".join(
        [
            title,
            f"  WebSocket  ws://{base}/ws",
            f"  MQTT       {mqtt}",
            f"  publish    POST http://{base}/events  (Authorization: Bearer {key})",
            f"  health     http://{base}/healthz  http://{base}/readyz",
            f"  metrics    http://{base}/metrics",
            "  try it:",
            f"    curl -s -H 'Authorization: Bearer {key}' http://{base}/events \\",
            '      -d \'{"topic":"stocks/AAPL","eventSource":"demo",'
            '"eventType":"PRICE_CHANGED","eventDetails":{"price":189.5}}\'',
            "",
        ]
    )


def _run(settings: Settings, title: str) -> None:
    from gateway.broker import BrokerError, EmbeddedBroker
    from gateway.server import bind, build_server

    try:
        sock = bind(settings)
    except OSError as exc:
        raise click.ClickException(str(exc.strerror or exc)) from exc
    port = sock.getsockname()[1]
    settings = settings.model_copy(update={"port": port})
    broker = None
    if settings.mqtt_url is None and settings.mqtt_broker == "embedded":
        assert settings.api_key is not None
        broker = EmbeddedBroker(
            settings.host,
            settings.mqtt_port,
            settings.mqtt_ws_port,
            settings.api_key.get_secret_value(),
            settings.mqtt_data_dir,
            settings.mqtt_prefix,
        )
        try:
            broker.start()
        except BrokerError as exc:
            sock.close()
            raise click.ClickException(str(exc)) from exc
        settings = settings.model_copy(update={"mqtt_url": broker.url()})
    try:
        server = build_server(settings)
        backend = "in-memory state"
        if settings.redis_url:
            backend = f"Redis at {without_credentials(settings.redis_url)}"
        click.echo(_banner(settings, f"{title} ({backend})", broker))
        server.run(sockets=[sock])
    finally:
        # After the server: its shutdown publishes what the bridge still holds.
        if broker is not None:
            broker.stop()
    if not server.started:
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Real-time notification gateway: events over HTTP in, WebSocket push out."""


@main.command()
@settings_options()
def serve(**given: Any) -> None:
    """Run the gateway service."""
    _run(_settings(given), "notification gateway")


@main.command()
@settings_options()
def demo(**given: Any) -> None:
    """Run everything built so far on embedded defaults, with no outside service."""
    _run(_settings(given), "notification gateway demo")


@main.command()
@settings_options(
    "host",
    "mqtt_port",
    "mqtt_ws_port",
    "mqtt_data_dir",
    "mqtt_prefix",
    "api_key",
    "log_level",
)
@click.option(
    "--until-stdin-closes",
    is_flag=True,
    hidden=True,
    help="Stop when standard input ends (used by the gateway that starts it).",
)
def broker(until_stdin_closes: bool, **given: Any) -> None:
    """Run the embedded MQTT broker on its own.

    Anyone may subscribe to the public topic trees and to single job topics;
    only the user 'gateway', with the API key as password, may publish.
    """
    from gateway.broker import BrokerError, serve_broker

    settings = _settings(given)
    assert settings.api_key is not None
    if not until_stdin_closes:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        key = settings.api_key.get_secret_value()
        click.echo(
            f"embedded MQTT broker on mqtt://{host}:{settings.mqtt_port} and "
            f"ws://{host}:{settings.mqtt_ws_port}\n"
            f"  gateway serve --mqtt-url "
            f"mqtt://gateway:{quote(key, safe='')}@{host}:{settings.mqtt_port}"
        )
    try:
        serve_broker(
            settings.host,
            settings.mqtt_port,
            settings.mqtt_ws_port,
            settings.api_key.get_secret_value(),
            until_stdin_closes=until_stdin_closes,
            data_dir=Path(settings.mqtt_data_dir) if settings.mqtt_data_dir else None,
            prefix=settings.mqtt_prefix,
        )
    except BrokerError as exc:
        if until_stdin_closes:
            # The gateway that started this process shows the reason.
            sys.exit(1)
        raise click.ClickException(str(exc)) from exc


@main.command(
    "fanout-bench",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def fanout_bench(ctx: click.Context) -> None:
    """Fan-out benchmark: the gateway against a raw websockets server."""
    from clients.fanout_bench import main as bench_main  # type: ignore[import-not-found,unused-ignore]

    sys.exit(bench_main(ctx.args))


@main.command()
@settings_options()
def worker(**given: Any) -> None:
    """Run jobs from the Redis job queue, --job-workers at once, without HTTP."""
    import asyncio

    from gateway.errors import Unavailable
    from gateway.jobs.worker import run_worker

    settings = _settings(given)
    if settings.redis_url is None:
        raise click.UsageError(
            "gateway worker needs --redis-url / GATEWAY_REDIS_URL; with in-memory "
            "state, jobs run inside gateway serve"
        )
    if settings.job_workers < 1:
        raise click.UsageError("--job-workers / GATEWAY_JOB_WORKERS: at least 1")
    try:
        asyncio.run(run_worker(settings))
    except Unavailable as exc:
        raise click.ClickException(str(exc)) from exc


@main.command(
    "poll-bench",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def poll_bench(ctx: click.Context) -> None:
    """Polling benchmark: many clients polling one topic while events flow."""
    from clients.poll_bench import main as bench_main  # type: ignore[import-not-found,unused-ignore]

    sys.exit(bench_main(ctx.args))
