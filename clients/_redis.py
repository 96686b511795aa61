"""The Redis the gateway's replicas share during a run, and cleaning up after it.

Every run of a Redis-backed configuration gets a key prefix of its own, so that it
neither sees nor touches anybody else's keys on a shared Redis; once its replicas
have stopped, the keys under that prefix are deleted, and nothing else. This module
talks to Redis synchronously: it runs only between runs, never while measuring.
"""

from __future__ import annotations

import secrets

import redis
from redis.exceptions import RedisError

from clients._wire import BenchError

__all__ = ["DEFAULT_REDIS_URL", "RedisRun", "check_redis", "safe_url"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Keys deleted per ``UNLINK``.
_DELETE_BATCH = 500
#: Seconds any one Redis command may take here.
_TIMEOUT = 5.0


def safe_url(url: str) -> str:
    """``url`` without the user name and password it may carry."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def _connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT
    )


def check_redis(url: str) -> None:
    """Fail early, with a clear message, if Redis does not answer a ``PING``.

    Raises:
        BenchError: Redis is unreachable or refused the command.
    """
    try:
        with _connect(url) as client:
            client.ping()
    except (RedisError, OSError, ValueError) as exc:
        raise BenchError(f"redis at {safe_url(url)} unreachable: {exc}") from exc


class RedisRun:
    """One run's share of Redis: a fresh key prefix and its cleanup."""

    def __init__(self, url: str) -> None:
        """Choose a prefix no other run uses; nothing is connected yet.

        Args:
            url: the ``redis://`` URL given to every replica of the run.
        """
        self.url = url
        # Only letters, digits, '-' and ':', so that the prefix followed by '*'
        # is a glob matching exactly the keys that start with it.
        self.prefix = f"fanout-bench:{secrets.token_hex(8)}:"

    def delete_keys(self) -> int:
        """Delete every key under this run's prefix, and no other.

        Call it once the replicas have stopped, so none writes a key afterwards.

        Returns:
            How many keys were deleted.

        Raises:
            BenchError: Redis failed; the keys left behind are named by prefix.
        """
        deleted = 0
        try:
            with _connect(self.url) as client:
                batch: list[bytes] = []
                for key in client.scan_iter(match=f"{self.prefix}*", count=1000):
                    batch.append(key)
                    if len(batch) >= _DELETE_BATCH:
                        deleted += int(client.unlink(*batch))
                        batch.clear()
                if batch:
                    deleted += int(client.unlink(*batch))
        except (RedisError, OSError) as exc:
            raise BenchError(
                f"could not delete the keys under {self.prefix!r} in redis at "
                f"{safe_url(self.url)}: {exc}"
            ) from exc
        return deleted
