"""What the benchmark commands share: SIGTERM, checked URLs, secrets kept out."""

from __future__ import annotations

import argparse
import shlex
import signal
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "MASK",
    "check_gateway_url",
    "http_address",
    "masked_command",
    "masked_url",
    "stop_on_sigterm",
]

#: What a secret is replaced with wherever a report shows it.
MASK = "***"


def stop_on_sigterm() -> None:
    """Make SIGTERM stop the command as Ctrl-C does.

    The benchmarks start gateways and brokers as child processes and stop them
    in ``finally`` clauses. Python's default SIGTERM action ends the process at
    once, leaving those children running; raising ``KeyboardInterrupt``
    instead unwinds the stack, so the clean-ups run. Call it from the main
    thread, before any child is started.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def masked_url(url: str) -> str:
    """``url`` with the password it may carry replaced by :data:`MASK`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    login, _, host = parts.netloc.rpartition("@")
    user = login.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def masked_command(words: Sequence[str], secrets: Mapping[str, str]) -> str:
    """The shell form of ``words``, each secret value replaced by its mask.

    Args:
        words: the command line, program name included.
        secrets: secret value to what stands in its place; a word equal to a
            value is replaced, and so is the value of an ``--option=value``.
    """
    shown = []
    for word in words:
        name, equals, value = word.partition("=")
        if word in secrets:
            word = secrets[word]
        elif word.startswith("--") and equals and value in secrets:
            word = f"{name}={secrets[value]}"
        shown.append(word)
    return shlex.join(shown)


def http_address(url: str) -> tuple[str, int]:
    """The host and port of a gateway given as ``http://host[:port]``.

    Raises:
        ValueError: ``url`` is not of that form; the message says why.
    """
    parts = urlsplit(url)
    if parts.scheme == "https":
        raise ValueError("https is not supported, the clients speak plain HTTP")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected http://host[:port], not {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no user or password in the URL; use --api-key")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"expected no path, query or fragment in {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}") from exc
    if port == 0:
        raise ValueError(f"port 0 is not a gateway's port in {url!r}")
    return parts.hostname, port or 80


def check_gateway_url(
    parser: argparse.ArgumentParser, url: str, api_key: str | None
) -> None:
    """Exit with a usage error unless ``url`` is a gateway and a key goes with it."""
    try:
        http_address(url)
    except ValueError as exc:
        parser.error(f"--url: {exc}")
    if not api_key:
        parser.error("--url needs --api-key to publish")
