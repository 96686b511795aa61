"""Publish events at a steady rate from a process of its own (run as a script).

Tests that measure delivery latency start this beside their reader, so that the
publisher's clock is never held up by the reader's work. Each event carries
``sentAt``, the wall-clock time its batch was sent, and ``n``, its number. The
summary printed on standard output as one JSON line says how the pacing went.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx
import orjson


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="the gateway's HTTP base URL")
    parser.add_argument("--key", required=True, help="its API key")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True, help="events to send")
    parser.add_argument("--batch", type=int, default=20, help="events per request")
    parser.add_argument(
        "--interval", type=float, default=0.01, help="seconds between requests"
    )
    parser.add_argument(
        "--pad", type=int, default=0, help="characters of padding per event"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Send ``count`` events in batches on a fixed schedule; print a summary."""
    args = _arguments(argv)
    pad = "x" * args.pad
    headers = {
        "Authorization": f"Bearer {args.key}",
        "Content-Type": "application/json",
    }
    failures: list[str] = []
    most_late = 0.0
    sent = 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=10) as client:
        started = time.monotonic()
        batch_number = 0
        while sent < args.count:
            # Each batch has its slot on the clock; a late one goes at once and
            # the schedule does not slip, so the average rate stays as asked.
            due = started + batch_number * args.interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                most_late = max(most_late, -delay)
            size = min(args.batch, args.count - sent)
            sent_at = time.time()
            items = [
                {
                    "topic": args.topic,
                    "eventSource": "tests",
                    "eventType": "PRICE_CHANGED",
                    "eventDetails": {"n": sent + i, "sentAt": sent_at, "pad": pad},
                }
                for i in range(size)
            ]
            response = client.post("/events", content=orjson.dumps(items))
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:200]}")
            sent += size
            batch_number += 1
        duration = time.monotonic() - started
    summary = {
        "sent": sent,
        "duration": duration,
        "mostLate": most_late,
        "failures": failures[:10],
        "failureCount": len(failures),
    }
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
