"""Who may publish: the operator's API key, scoped publish keys, webhook secrets.

The operator's key (``--api-key``) may do everything: publish on any topic, start
and cancel jobs, read ``/admin/stats``. A keys file (``--keys-file``, TOML) adds
publish keys that may each write only some topic trees, and the secrets that sign
webhook deliveries::

    [[publish_keys]]
    name = "stocks-feed"          # in logs, never the key itself
    sha256 = "9f86d0..."          # hex SHA-256 of the key (or: key = "...")
    topics = ["stocks/#"]         # topic filters it may publish on
    jobs = false                  # may start and cancel jobs, and publish on
                                  # jobs/... within its topics (default false)
    admin = false                 # may read /admin/stats (default false)

    [[webhook_secrets]]
    name = "fixtures-2026-12"
    secret = "at least 16 characters"

Every key and secret listed is valid at once, so a rotation adds the new one,
moves the senders over, then removes the old one. The gateway reads the file
again whenever it changes (checked every second), without a restart; a file that
no longer parses is logged and the keys read before stay in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.errors import BadTopic, Forbidden, Unauthorized
from gateway.events.topics import filter_matches, validate_filter

__all__ = [
    "KeyRing",
    "KeysFile",
    "Principal",
    "PublishKey",
    "load_keys_file",
]

logger = logging.getLogger(__name__)

#: Seconds between two looks at the keys file's modification time.
RELOAD_INTERVAL = 1.0

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")
_KEY_FIELDS = frozenset({"name", "sha256", "key", "topics", "jobs", "admin"})
_SECRET_FIELDS = frozenset({"name", "secret"})
_MIN_KEY_LENGTH = 8
_MIN_SECRET_LENGTH = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    """What the holder of one key may do."""

    name: str
    #: Topic filters it may publish on; ``("#",)`` for the operator.
    topics: tuple[str, ...]
    jobs: bool
    admin: bool

    def check_publish(self, topics: Iterable[str]) -> None:
        """Refuse the whole batch unless every topic is in this key's scope.

        The ``jobs`` tree carries the progress of jobs, which their followers
        trust as the job's own: publishing there also takes the ``jobs`` right,
        so that a key scoped to ``#`` cannot forge a job's events.

        Raises:
            Forbidden: a topic no filter of the key matches, or a job topic
                without the ``jobs`` right; names it.
        """
        for topic in topics:
            if not self.jobs and topic.partition("/")[0] == "jobs":
                raise Forbidden(
                    f"key {self.name!r} may not publish on {topic!r}: the jobs "
                    "tree takes the jobs right"
                )
            if not any(filter_matches(scope, topic) for scope in self.topics):
                raise Forbidden(
                    f"key {self.name!r} may not publish on {topic!r}; "
                    f"its topics: {', '.join(self.topics)}"
                )

    def check_jobs(self) -> None:
        """Raises Forbidden unless this key may start and cancel jobs."""
        if not self.jobs:
            raise Forbidden(f"key {self.name!r} may not start or cancel jobs")

    def check_admin(self) -> None:
        """Raises Forbidden unless this key may read the admin API."""
        if not self.admin:
            raise Forbidden(f"key {self.name!r} may not read the admin API")


@dataclass(frozen=True, slots=True)
class PublishKey:
    """One key of the keys file: its SHA-256 and what its holder may do."""

    digest: bytes
    principal: Principal


@dataclass(frozen=True, slots=True)
class KeysFile:
    """What one reading of the keys file gave."""

    publish_keys: tuple[PublishKey, ...] = ()
    webhook_secrets: tuple[bytes, ...] = ()


def load_keys_file(path: str | Path) -> KeysFile:
    """Read and check a keys file.

    Raises:
        ValueError: the file cannot be read, is not TOML, or an entry is
            malformed; the message names the entry and the field.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not TOML: {exc}") from exc
    unknown = sorted(data.keys() - {"publish_keys", "webhook_secrets"})
    if unknown:
        raise ValueError(f"{path}: unknown table {unknown[0]!r}")
    keys = tuple(
        _publish_key(entry, f"publish_keys[{index}]")
        for index, entry in enumerate(_tables(data, "publish_keys"))
    )
    names = [key.principal.name for key in keys]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{path}: two publish keys are named {name!r}")
    secrets = tuple(
        _webhook_secret(entry, f"webhook_secrets[{index}]")
        for index, entry in enumerate(_tables(data, "webhook_secrets"))
    )
    return KeysFile(keys, secrets)


def _tables(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    tables = data.get(name, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{name}: expected an array of tables ([[{name}]])")
    return tables


def _publish_key(entry: dict[str, Any], where: str) -> PublishKey:
    unknown = sorted(entry.keys() - _KEY_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}.name: expected 1 to 64 of A-Z a-z 0-9 _ . : @ -")
    where = f"publish key {name!r}"
    if ("sha256" in entry) == ("key" in entry):
        raise ValueError(f"{where}: give either sha256 or key")
    if "key" in entry:
        key = entry["key"]
        if not isinstance(key, str) or len(key.strip()) < _MIN_KEY_LENGTH:
            raise ValueError(f"{where}.key: expected at least 8 characters")
        digest = _digest(key)
    else:
        hex_digest = entry["sha256"]
        if not isinstance(hex_digest, str) or not _HEX_DIGEST.fullmatch(hex_digest):
            raise ValueError(f"{where}.sha256: expected 64 lowercase hex digits")
        digest = bytes.fromhex(hex_digest)
    topics = entry.get("topics")
    if not isinstance(topics, list) or not topics:
        raise ValueError(f"{where}.topics: expected a non-empty array of filters")
    for topic_filter in topics:
        try:
            validate_filter(topic_filter)
        except BadTopic as exc:
            raise ValueError(f"{where}.topics: {exc}") from exc
    flags = {}
    for flag in ("jobs", "admin"):
        value = entry.get(flag, False)
        if not isinstance(value, bool):
            raise ValueError(f"{where}.{flag}: expected true or false")
        flags[flag] = value
    principal = Principal(name, tuple(topics), flags["jobs"], flags["admin"])
    return PublishKey(digest, principal)


def _webhook_secret(entry: dict[str, Any], where: str) -> bytes:
    unknown = sorted(entry.keys() - _SECRET_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    secret = entry.get("secret")
    if not isinstance(secret, str) or len(secret) < _MIN_SECRET_LENGTH:
        raise ValueError(f"{where}.secret: expected at least 16 characters")
    return secret.encode()


class KeyRing:
    """The keys and secrets in force, read again when the keys file changes.

    Lookups are in memory and safe from any task; ``watch`` is the one task that
    replaces what they read, whole, so a lookup never sees half a file.
    """

    def __init__(
        self,
        operator_key: str | None,
        *,
        webhook_secret: str | None = None,
        keys_file: str | None = None,
        stat: Callable[[str], os.stat_result] = os.stat,
    ) -> None:
        """Start from the operator's key, one webhook secret and a keys file.

        Raises:
            ValueError: the keys file is invalid (see ``load_keys_file``).
        """
        self._operator = _digest(operator_key) if operator_key else None
        self._webhook_secret = webhook_secret.encode() if webhook_secret else None
        self._path = keys_file
        self._stat = stat
        # The file as last read, and its identity then (inode, size, mtime),
        # compared on every look to tell whether it changed.
        self._file = KeysFile()
        self._seen: tuple[int, int, int] | None = None
        if keys_file is not None:
            self._seen = self._identity()
            self._file = load_keys_file(keys_file)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The key ring of ``--api-key``, ``--webhook-secret`` and ``--keys-file``.

        Raises:
            ValueError: the keys file is invalid.
        """
        api_key, secret = settings.api_key, settings.webhook_secret
        return cls(
            api_key.get_secret_value() if api_key else None,
            webhook_secret=secret.get_secret_value() if secret else None,
            keys_file=settings.keys_file,
        )

    @property
    def webhook_secrets(self) -> tuple[bytes, ...]:
        """Every secret a webhook delivery may be signed with now."""
        given = (self._webhook_secret,) if self._webhook_secret else ()
        return given + self._file.webhook_secrets

    @property
    def publish_key_count(self) -> int:
        """Publish keys in force, the operator's not counted."""
        return len(self._file.publish_keys)

    def authenticate(self, authorization: str | None) -> Principal:
        """The holder of the bearer key in an ``Authorization`` header.

        Every known key is compared, each in constant time, so that timings
        tell nothing about which key, or how much of one, was close.

        Raises:
            Unauthorized: no bearer key, or one that matches no key.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing bearer API key")
        digest = _digest(token)
        found: Principal | None = None
        if self._operator is not None and hmac.compare_digest(digest, self._operator):
            found = _OPERATOR
        for key in self._file.publish_keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.principal
        if found is None:
            raise Unauthorized("wrong API key")
        return found

    def reload_if_changed(self) -> bool:
        """Read the keys file again if it changed; tell whether it was read.

        A file that is gone or no longer valid leaves the keys in force as they
        were, and is logged once per change.
        """
        if self._path is None:
            return False
        error = None
        try:
            identity: tuple[int, int, int] | None = self._identity()
        except OSError as exc:
            identity = None
            error = f"cannot read {self._path}: {exc.strerror or exc}"
        if identity == self._seen:
            return False
        self._seen = identity
        if error is None:
            try:
                loaded = load_keys_file(self._path)
            except ValueError as exc:
                error = str(exc)
            else:
                self._file = loaded
                logger.info(
                    "keys file %s read: %d publish keys, %d webhook secrets",
                    self._path,
                    len(loaded.publish_keys),
                    len(loaded.webhook_secrets),
                )
                return True
        logger.warning("keys file not usable, the keys before stay: %s", error)
        return False

    async def watch(self, interval: float = RELOAD_INTERVAL) -> None:
        """Look at the keys file every ``interval`` seconds until cancelled."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                # Reading a file blocks; a small one, but off the event loop.
                await asyncio.to_thread(self.reload_if_changed)
            except Exception:
                # A bug here must not end rotation for the life of the process.
                logger.exception("reading the keys file %s failed", self._path)

    def _identity(self) -> tuple[int, int, int]:
        assert self._path is not None
        result = self._stat(self._path)
        return (result.st_ino, result.st_size, result.st_mtime_ns)


#: The operator's key: every right.
_OPERATOR = Principal("operator", ("#",), jobs=True, admin=True)
