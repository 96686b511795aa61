"""The ``gateway`` command: serve, demo and the fan-out benchmark."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import typing
from collections.abc import Callable, Iterator
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
    webhooks = []
    if settings.webhook_secret is not None:
        secret = settings.webhook_secret.get_secret_value()
        webhooks = [
            f"  webhooks   POST http://{base}/webhooks/fixtures  "
            f"(signed with --webhook-secret {secret})"
        ]
    return "\n".join(
        [
            title,
            f"  page       http://{base}/  (the three strategies side by side)",
            f"  WebSocket  ws://{base}/ws",
            f"  MQTT       {mqtt}",
            f"  publish    POST http://{base}/events  (Authorization: Bearer {key})",
            *webhooks,
            f"  health     http://{base}/healthz  http://{base}/readyz",
            f"  metrics    http://{base}/metrics",
            "  try it:",
            f"    curl -s -H 'Authorization: Bearer {key}' http://{base}/events \\",
            '      -d \'{"topic":"stocks/AAPL","eventSource":"demo",'
            '"eventType":"PRICE_CHANGED","eventDetails":{"price":189.5}}\'',
            "",
        ]
    )


def _check_redis(url: str) -> None:
    """Fail at start, in one line, when Redis does not answer a PING.

    The backend would fail the same way a moment later, but inside uvicorn's
    start-up, which reports it with tracebacks after the banner.

    Raises:
        click.ClickException: Redis is unreachable; the message names the flag.
    """
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise click.ClickException(
            f"Redis at {without_credentials(url)} unreachable ({exc}); "
            "check --redis-url or GATEWAY_REDIS_URL"
        ) from exc
    finally:
        client.close()


def _run(
    settings: Settings,
    title: str,
    beside: Callable[[Settings], contextlib.AbstractContextManager[object]]
    | None = None,
) -> None:
    """Serve until stopped; ``beside``, given the final settings, wraps serving."""
    from gateway.broker import BrokerError, EmbeddedBroker
    from gateway.server import bind, build_server

    try:
        sock = bind(settings)
    except OSError as exc:
        raise click.ClickException(str(exc.strerror or exc)) from exc
    port = sock.getsockname()[1]
    settings = settings.model_copy(update={"port": port})
    if settings.redis_url is not None:
        try:
            _check_redis(settings.redis_url)
        except click.ClickException:
            sock.close()
            raise
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
        # The browser page reaches the embedded broker on the host it was
        # loaded from, unless --mqtt-public-ws-url says otherwise.
        page_ws = settings.mqtt_public_ws_url or f"ws://{{host}}:{broker.ws_port}/mqtt"
        settings = settings.model_copy(
            update={"mqtt_url": broker.url(), "mqtt_public_ws_url": page_ws}
        )
    try:
        server = build_server(settings)
        backend = "in-memory state"
        if settings.redis_url:
            backend = f"Redis at {without_credentials(settings.redis_url)}"
        click.echo(_banner(settings, f"{title} ({backend})", broker))
        with beside(settings) if beside else contextlib.nullcontext():
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
    # The browser page may start demo jobs without the key, here only.
    if given.get("demo_page_jobs") is None:
        given["demo_page_jobs"] = os.environ.get("GATEWAY_DEMO_PAGE_JOBS", "true")
    settings = _settings(given)
    if settings.webhook_secret is None:
        # The demo's fixtures feed signs with it; nobody else needs to know it.
        secret = SecretStr(secrets.token_urlsafe(24))
        settings = settings.model_copy(update={"webhook_secret": secret})
    _run(settings, "notification gateway demo", beside=_demo_producers)


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


@main.command()
@click.argument("topics", nargs=-1, required=True)
@click.option(
    "--via",
    type=click.Choice(["poll", "ws", "mqtt"]),
    default="ws",
    show_default=True,
    help="Strategy: HTTP polling, WebSocket push or MQTT push.",
)
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The gateway, for poll and ws.",
)
@click.option(
    "--mqtt-url",
    default="mqtt://127.0.0.1:1883",
    show_default=True,
    help="The MQTT broker the gateway publishes to, for mqtt.",
)
@click.option(
    "--poll-interval",
    type=float,
    default=None,
    help="Least seconds between polls (default: the gateway's Retry-After).",
)
@click.option("--count", type=int, default=None, help="Stop after this many events.")
def listen(
    topics: tuple[str, ...],
    via: str,
    url: str,
    mqtt_url: str,
    poll_interval: float | None,
    count: int | None,
) -> None:
    """Print each event of TOPICS with its delay since it was published."""
    from clients.listen import listen as run_listen  # type: ignore[import-not-found,unused-ignore]

    try:
        status = run_listen(
            via,
            topics,
            url=url,
            mqtt_url=mqtt_url,
            poll_interval=poll_interval,
            count=count,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    sys.exit(status)


# Producers: separate processes that feed a gateway through its public ingress.

_GATEWAY_URL = "http://127.0.0.1:8000"


def _producer_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every producer takes, read from ``GATEWAY_`` variables too."""
    options = [
        click.option(
            "--url",
            envvar=f"{ENV_PREFIX}URL",
            default=_GATEWAY_URL,
            show_default=True,
            help=f"The gateway's base URL [env {ENV_PREFIX}URL].",
        ),
        click.option(
            "--duration",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Seconds to run at most [default: until the data ends].",
        ),
        click.option(
            "--loop", is_flag=True, help="Start again at the end of the data."
        ),
        click.option(
            "--wait",
            type=click.FloatRange(min=0),
            default=30.0,
            show_default=True,
            help="Seconds to wait for the gateway to be ready at start.",
        ),
        click.option(
            "--log-level",
            envvar=f"{ENV_PREFIX}LOG_LEVEL",
            type=click.Choice(["debug", "info", "warning", "error"]),
            default="info",
            show_default=True,
            help=f"Lowest level logged [env {ENV_PREFIX}LOG_LEVEL].",
        ),
        click.option("--until-stdin-closes", is_flag=True, hidden=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _producer_logging(level: str) -> None:
    configure_logging(level, "plain")
    # A line per request is the producers' own DEBUG lines' job.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _finish(failed: int) -> None:
    if failed:
        raise click.ClickException(f"{failed} deliveries failed for good")


@main.group()
def produce() -> None:
    """Run an event producer that feeds a gateway through its public ingress."""


@produce.command()
@_producer_options
@click.option(
    "--api-key",
    envvar=f"{ENV_PREFIX}API_KEY",
    required=True,
    help=f"The gateway's publish API key [env {ENV_PREFIX}API_KEY].",
)
@click.option(
    "--symbols",
    default=None,
    help="Comma-separated symbols to send, such as AAPL,MSFT [default: all].",
)
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV with symbol, time and price columns [default: the stock prices of "
    "the vega_datasets package].",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Events per second, steady [default: 10 unless --speed is given].",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Pace by market time instead: market seconds per second.",
)
def stocks(
    url: str,
    api_key: str,
    symbols: str | None,
    path: Path | None,
    rate: float | None,
    speed: float | None,
    duration: float | None,
    loop: bool,
    wait: float,
    log_level: str,
    until_stdin_closes: bool,
) -> None:
    """Replay real historical stock prices as PRICE_CHANGED events."""
    import asyncio

    from producers import stocks as feed
    from producers._delivery import DeliveryError

    if rate is not None and speed is not None:
        raise click.UsageError("give --rate or --speed, not both")
    _producer_logging(log_level)
    try:
        totals = asyncio.run(
            feed.run(
                url.rstrip("/"),
                api_key,
                rate=rate if speed is not None or rate is not None else 10.0,
                speed=speed,
                duration=duration,
                loop=loop,
                symbols=symbols.split(",") if symbols else None,
                path=path,
                wait=wait,
                until_stdin_closes=until_stdin_closes,
            )
        )
    except (DeliveryError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(totals.failed)


@produce.command()
@_producer_options
@click.option(
    "--webhook-secret",
    envvar=f"{ENV_PREFIX}WEBHOOK_SECRET",
    required=True,
    help=f"The secret that signs deliveries [env {ENV_PREFIX}WEBHOOK_SECRET].",
)
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Match file (JSON) [default: the 2022 World Cup final].",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Match minutes replayed per second.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=6,
    show_default=True,
    help="Retries of a failing delivery before it fails for good.",
)
def fixtures(
    url: str,
    webhook_secret: str,
    path: Path | None,
    speed: float,
    retries: int,
    duration: float | None,
    loop: bool,
    wait: float,
    log_level: str,
    until_stdin_closes: bool,
) -> None:
    """Replay a real match's key events as signed webhooks."""
    import asyncio

    from producers import fixtures as feed
    from producers._delivery import DeliveryError

    _producer_logging(log_level)
    try:
        totals = asyncio.run(
            feed.run(
                url.rstrip("/"),
                webhook_secret,
                speed=speed,
                duration=duration,
                loop=loop,
                path=path,
                retries=retries,
                wait=wait,
                until_stdin_closes=until_stdin_closes,
            )
        )
    except (DeliveryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(totals.failed)


#: Pace of the demo's feeds: a few prices a second, and a match minute every
#: sixth of a second, so that key events come every second or two.
_DEMO_STOCKS_RATE = 4.0
_DEMO_MATCH_SPEED = 6.0


@contextlib.contextmanager
def _demo_producers(settings: Settings) -> Iterator[None]:
    """Run both producers as child processes while the demo gateway serves.

    They wait for the gateway to be ready, and stop when their standard input
    closes: when this block ends, or when the demo dies.
    """
    import subprocess

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}"
    env = dict(os.environ)
    assert settings.api_key is not None and settings.webhook_secret is not None
    env[f"{ENV_PREFIX}API_KEY"] = settings.api_key.get_secret_value()
    env[f"{ENV_PREFIX}WEBHOOK_SECRET"] = settings.webhook_secret.get_secret_value()
    env[f"{ENV_PREFIX}LOG_LEVEL"] = settings.log_level
    base = [sys.executable, "-m", "gateway", "produce"]
    common = ["--url", url, "--loop", "--until-stdin-closes"]
    commands = [
        [*base, "stocks", *common, "--rate", str(_DEMO_STOCKS_RATE)],
        [*base, "fixtures", *common, "--speed", str(_DEMO_MATCH_SPEED)],
    ]
    children = [
        subprocess.Popen(command, stdin=subprocess.PIPE, env=env)
        for command in commands
    ]
    click.echo(
        "  producers  stocks on stocks/#, the 2022 World Cup final on "
        "fixtures/# and teams/#\n"
    )
    try:
        yield
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@main.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Polling, WebSocket and MQTT side by side: latency, bytes, load, cost."""
    from clients.bench import main as bench_main  # type: ignore[import-not-found,unused-ignore]

    sys.exit(bench_main(ctx.args))
