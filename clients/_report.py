"""The fan-out benchmark's report: medians of the runs, a table, targets, JSON.

The targets compare ``gateway`` (in memory) with ``baseline``; the Redis-backed
and MQTT configurations get their columns in the table but no targets.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from websockets.version import version as websockets_version

from clients._cli import masked_url
from clients._redis import safe_url
from clients._servers import uses_mqtt, uses_redis

if TYPE_CHECKING:
    from clients.fanout_bench import Options

__all__ = ["Results", "medians", "render_report", "targets", "write_json"]

#: Server kind to the metrics of each of its runs, keyed ``phase.metric``.
Results = dict[str, list[dict[str, float]]]


class _Row(NamedTuple):
    """One line of the table."""

    key: str
    label: str
    pattern: str = "{:.1f}"
    # Whether a gateway/baseline ratio means something for this metric.
    compare: bool = True


_COUNT = "{:,.0f}"
_ROWS = [
    _Row("idle.processes", "server processes", _COUNT, compare=False),
    _Row("idle.subscribers", "subscribers connected", _COUNT, compare=False),
    _Row("idle.rss_before_mb", "idle: RSS before subscribers, MB"),
    _Row("idle.rss_after_mb", "idle: RSS with subscribers, MB"),
    _Row("idle.kb_per_connection", "idle: RSS per connection, KB"),
    _Row("steady.deliveries_per_s", "steady: deliveries/s", _COUNT),
    _Row("steady.p50_ms", "steady: latency p50, ms"),
    _Row("steady.p99_ms", "steady: latency p99, ms"),
    _Row("steady.max_ms", "steady: latency max, ms"),
    _Row("steady.lost", "steady: lost deliveries", _COUNT, compare=False),
    _Row("steady.lost_worst", "steady: lost, worst run", _COUNT, compare=False),
    _Row("steady.duplicates_worst", "steady: duplicates, worst run", _COUNT, False),
    _Row("steady.server_cpu_us_per_delivery", "steady: server CPU µs/delivery"),
    _Row(
        "steady.gateway_cpu_us_per_delivery", "steady: of which gateway", compare=False
    ),
    _Row("steady.broker_cpu_us_per_delivery", "steady: of which broker", compare=False),
    _Row("steady.client_cpu_us_per_delivery", "steady: client CPU µs/delivery"),
    _Row("steady.other_cores", "steady: other processes, cores", "{:.2f}", False),
    _Row("steady.behind_schedule", "steady: events sent late", _COUNT, False),
    _Row("steady.bridge_dropped", "steady: events dropped by bridge", _COUNT, False),
    _Row("burst.deliveries_per_s", "burst: deliveries/s", _COUNT),
    _Row("burst.server_cpu_us_per_delivery", "burst: server CPU µs/delivery"),
    _Row("burst.gateway_cpu_us_per_delivery", "burst: of which gateway", compare=False),
    _Row("burst.broker_cpu_us_per_delivery", "burst: of which broker", compare=False),
    _Row("burst.server_sys_share", "burst: server CPU in kernel", "{:.0%}"),
    _Row("burst.client_cpu_us_per_delivery", "burst: client CPU µs/delivery"),
    _Row("burst.other_cores", "burst: other processes, cores", "{:.2f}", False),
    _Row("burst.p50_ms", "burst: latency p50, ms"),
    _Row("burst.p99_ms", "burst: latency p99, ms"),
    _Row("burst.max_ms", "burst: latency max, ms"),
    _Row("burst.lost", "burst: lost deliveries", _COUNT, compare=False),
    _Row("burst.lost_worst", "burst: lost, worst run", _COUNT, compare=False),
    _Row("burst.duplicates_worst", "burst: duplicates, worst run", _COUNT, False),
    _Row("burst.closed", "burst: connections closed by server", _COUNT, False),
    _Row("burst.bridge_dropped", "burst: events dropped by bridge", _COUNT, False),
    _Row("burst.marked_dup", "burst: deliveries marked DUP", _COUNT, False),
    _Row("burst.server_rss_mb", "burst: RSS after, MB"),
]

_STEADY_P99_LIMIT_MS = 100.0
_STEADY_P99_MAX_RATIO = 1.5
_IDLE_KB_LIMIT = 20.0


def medians(results: Results) -> dict[str, dict[str, float]]:
    """Per server, the median of every metric over its runs.

    ``phase.lost_worst`` and ``phase.duplicates_worst`` are added: the
    largest of any run, since a median can hide one run that went wrong.
    """
    summary: dict[str, dict[str, float]] = {}
    for kind, runs in results.items():
        keys = sorted({key for run in runs for key in run})
        row = {
            key: statistics.median(run[key] for run in runs if key in run)
            for key in keys
        }
        for phase in ("steady", "burst"):
            for fault in ("lost", "duplicates"):
                key = f"{phase}.{fault}"
                counts = [run[key] for run in runs if key in run]
                if counts:
                    row[f"{key}_worst"] = max(counts)
        summary[kind] = row
    return summary


def targets(results: Results) -> list[tuple[str, bool]]:
    """The issue's targets for the gateway that these results can decide."""
    summary = medians(results)
    gateway = summary.get("gateway", {})
    baseline = summary.get("baseline", {})
    checks: list[tuple[str, bool]] = []
    if "burst.deliveries_per_s" in gateway and "burst.deliveries_per_s" in baseline:
        checks.append(
            (
                "burst: gateway deliveries/s >= baseline's",
                gateway["burst.deliveries_per_s"] >= baseline["burst.deliveries_per_s"],
            )
        )
    if "steady.p99_ms" in gateway:
        checks.append(
            (
                "steady: gateway lost nothing in any run",
                gateway["steady.lost_worst"] == 0,
            )
        )
        checks.append(
            (
                f"steady: gateway p99 < {_STEADY_P99_LIMIT_MS:.0f} ms",
                gateway["steady.p99_ms"] < _STEADY_P99_LIMIT_MS,
            )
        )
    if "steady.p99_ms" in gateway and "steady.p99_ms" in baseline:
        checks.append(
            (
                f"steady: gateway p99 <= {_STEADY_P99_MAX_RATIO}x baseline's",
                gateway["steady.p99_ms"]
                <= _STEADY_P99_MAX_RATIO * baseline["steady.p99_ms"],
            )
        )
    if "idle.kb_per_connection" in gateway:
        checks.append(
            (
                f"idle: gateway RSS per connection <= {_IDLE_KB_LIMIT:.0f} KB",
                gateway["idle.kb_per_connection"] <= _IDLE_KB_LIMIT,
            )
        )
    return checks


def _cell(value: float | None, pattern: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return pattern.format(value)


def _table(summary: dict[str, dict[str, float]], kinds: list[str]) -> list[str]:
    both = "gateway" in summary and "baseline" in summary
    header = ["metric", *kinds] + (["gateway/baseline"] if both else [])
    rows = [header]
    for key, label, pattern, compare in _ROWS:
        values = [summary[kind].get(key) for kind in kinds]
        if all(value is None for value in values):
            continue
        row = [label, *(_cell(value, pattern) for value in values)]
        if both:
            gateway, baseline = (
                summary["gateway"].get(key),
                summary["baseline"].get(key),
            )
            row.append(_ratio(gateway, baseline) if compare else "")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _ratio(gateway: float | None, baseline: float | None) -> str:
    if gateway is None or baseline is None or not baseline or math.isnan(gateway):
        return "-"
    return f"{gateway / baseline:.2f}"


def render_report(results: Results, options: Options) -> str:
    """The plain-text report: settings, the table of medians, the targets."""
    summary = medians(results)
    kinds = list(results)
    runs = f"median of {options.runs} run{'s' if options.runs > 1 else ''}"
    title = f"{options.subscribers:,} subscribers of one topic"
    if "steady" in options.modes or "burst" in options.modes:
        title = (
            f"fan-out to {title}, {options.events} events per phase "
            f"(steady at {options.rate:g}/s)"
        )
    title = f"{title}, {runs}"
    lines = [title, "", *_table(summary, kinds)]
    lines.extend(_notes(summary, options))
    checks = targets(results)
    if checks:
        lines.append("")
        lines.extend(f"{'PASS' if ok else 'FAIL'}  {text}" for text, ok in checks)
    return "\n".join(lines)


def _notes(summary: dict[str, dict[str, float]], options: Options) -> list[str]:
    """What the reader must know about configurations of several processes."""
    notes = []
    for kind, row in summary.items():
        replicas = int(row.get("idle.replicas", row.get("idle.processes", 1)))
        if replicas > 1:
            notes.append(
                f"{kind}: {replicas} replicas sharing Redis, subscribers spread "
                "evenly, events published to the first; CPU and RSS are sums over "
                "the replicas, RSS per connection is the summed growth divided by "
                "all subscribers."
            )
    if any(uses_redis(kind) for kind in summary):
        notes.append(
            f"Redis at {safe_url(options.redis_url)}, a fresh key prefix per run; "
            "its own CPU is in 'other processes'."
        )
    notes.extend(_mqtt_notes(summary, options))
    return ["", *_wrap(notes)] if notes else []


def _mqtt_notes(summary: dict[str, dict[str, float]], options: Options) -> list[str]:
    """How the MQTT configurations were measured, when there are any."""
    kinds = [kind for kind in summary if uses_mqtt(kind)]
    if not kinds:
        return []
    notes = [
        f"{', '.join(kinds)}: events published over HTTP to the gateway, which "
        f"publishes each to the broker at QoS {options.mqtt_qos_level} under its "
        f"default rules; {options.subscribers:,} MQTT 3.1.1 subscribers of "
        f"{options.topic!r} at QoS {options.mqtt_qos_level}. Latency runs from "
        "the publisher to the MQTT subscriber. A delivery the broker dropped (a "
        "QoS 0 queue full) counts as lost, as does an event the bridge dropped, "
        "once per subscriber."
    ]
    if "gateway-mqtt" in kinds and options.mqtt_url is None:
        notes.append(
            "gateway-mqtt: a private Mosquitto started per run on a free loopback "
            f"port (max_queued_messages {options.mqtt_max_queued:,}, Nagle off); "
            "server CPU is the gateway's plus the broker's, both shown."
        )
    elif "gateway-mqtt" in kinds:
        notes.append(
            f"gateway-mqtt: the broker at {safe_url(options.mqtt_url or '')}; "
            "server CPU is the gateway's alone, the broker is not measured."
        )
    if "gateway-embedded-mqtt" in kinds:
        notes.append(
            "gateway-embedded-mqtt: the gateway's embedded broker (amqtt, a child "
            "process of the gateway); server CPU is the gateway's plus the "
            "broker's, both shown."
        )
    return notes


def _wrap(notes: list[str]) -> list[str]:
    return [
        line
        for note in notes
        for line in textwrap.wrap(note, 88, initial_indent="- ", subsequent_indent="  ")
    ]


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "websockets": websockets_version,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: Path, results: Results, options: Options) -> None:
    """Write options, environment, every run, the medians and the targets."""
    settings = asdict(options)
    settings["redis_url"] = safe_url(options.redis_url)
    if options.mqtt_url is not None:
        settings["mqtt_url"] = masked_url(options.mqtt_url)
    document = {
        "options": settings,
        "environment": _environment(),
        "runs": results,
        "medians": medians(results),
        "targets": [{"target": text, "passed": ok} for text, ok in targets(results)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Paths become strings; a NaN (a phase that received nothing) becomes null.
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2, default=str))
