"""The ``gateway`` command: serve, demo and the fan-out benchmark."""

from __future__ import annotations

import secrets
import sys
import typing
from collections.abc import Callable
from typing import Any

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


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one flag per setting; each reads its ``GATEWAY_`` variable as well."""
    for name, field in reversed(Settings.model_fields.items()):
        command = click.option(
            flag_name(name),
            name,
            type=_click_type(field.annotation),
            default=None,
            help=f"{field.description} [env {ENV_PREFIX}{name.upper()}; "
            f"default {_default_text(name)}]",
        )(command)
    return command


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


def _banner(settings: Settings, title: str) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"{host}:{settings.port}"
    key = settings.api_key.get_secret_value() if settings.api_key else ""
    return "\n".join(
        [
            title,
            f"  WebSocket  ws://{base}/ws",
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
    from gateway.server import bind, build_server

    try:
        sock = bind(settings)
    except OSError as exc:
        raise click.ClickException(str(exc.strerror or exc)) from exc
    port = sock.getsockname()[1]
    settings = settings.model_copy(update={"port": port})
    server = build_server(settings)
    backend = "in-memory state"
    if settings.redis_url:
        backend = f"Redis at {without_credentials(settings.redis_url)}"
    click.echo(_banner(settings, f"{title} ({backend})"))
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Real-time notification gateway: events over HTTP in, WebSocket push out."""


@main.command()
@settings_options
def serve(**given: Any) -> None:
    """Run the gateway service."""
    _run(_settings(given), "notification gateway")


@main.command()
@settings_options
def demo(**given: Any) -> None:
    """Run everything built so far on embedded defaults, with no outside service."""
    _run(_settings(given), "notification gateway demo")


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
