"""The report of ``gateway bench``: JSON with every figure, Markdown, PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients._cli import MASK, masked_url
from clients.cost import load_prices, monthly_costs

if TYPE_CHECKING:
    from clients.bench import Options, StrategyResult

__all__ = ["write_report"]

_LABELS = {"poll": "HTTP polling", "ws": "WebSocket push", "mqtt": "MQTT push"}
_COLORS = {"poll": "tab:orange", "ws": "tab:blue", "mqtt": "tab:green"}
#: The numbers of users the cost table and plot are drawn for.
_USERS = (100, 1_000, 10_000, 100_000, 1_000_000)


def _event_bytes(results: list[StrategyResult]) -> int:
    """The size of one event message, from the WebSocket or MQTT figures."""
    for result in results:
        if result.strategy in ("ws", "mqtt"):
            received = result.figures["bytes_per_client_per_event"]["received"]
            return max(1, round(float(received)))
    return 300


def _cost_section(options: Options, results: list[StrategyResult]) -> dict[str, Any]:
    prices = load_prices()
    size = _event_bytes(results)
    per_users = {
        str(users): {
            name: cost.as_dict()
            for name, cost in monthly_costs(
                users,
                options.rate,
                poll_interval=options.poll_interval,
                event_bytes=size,
                prices=prices,
            ).items()
        }
        for users in _USERS
    }
    return {
        "event_bytes": size,
        "events_per_second": options.rate,
        "poll_interval": options.poll_interval,
        "prices_taken_on": prices["taken_on"],
        "prices_note": prices["note"],
        "region": prices["region"],
        "by_users": per_users,
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"{text}{unit}"


def _markdown(
    options: Options, meta: dict[str, Any], results: list[StrategyResult], cost: Any
) -> str:
    names = [r.strategy for r in results]
    fig = {r.strategy: r.figures for r in results}
    header = "| | " + " | ".join(_LABELS[n] for n in names) + " |"
    rule = "|---|" + "---|" * len(names)

    def row(label: str, get: Any) -> str:
        return f"| {label} | " + " | ".join(get(fig[n]) for n in names) + " |"

    lat = "latency_ms"
    per_event = "bytes_per_client_per_event"
    rows = [
        row("latency p50 / p90 ms", lambda f: f"{_fmt(f[lat]['p50'])} / "
            f"{_fmt(f[lat]['p90'])}"),
        row("latency p99 / max ms", lambda f: f"{_fmt(f[lat]['p99'])} / "
            f"{_fmt(f[lat]['max'])}"),
        row("delivered / expected", lambda f: f"{_fmt(f['deliveries_unique'])} / "
            f"{_fmt(f['deliveries_expected'])}"),
        row("lost, duplicates", lambda f: f"{_fmt(f['lost'])}, "
            f"{_fmt(f['duplicates'])}"),
        row("bytes per client per event, sent / received",
            lambda f: f"{_fmt(f[per_event]['sent'])} / "
            f"{_fmt(f[per_event]['received'])}"),
        row("client requests or messages to the server /s",
            lambda f: _fmt(f["client_messages_per_second"])),
        row("deliveries /s", lambda f: _fmt(f["deliveries_per_second"])),
        row("gateway CPU, % of one core", lambda f: _fmt(f.get("gateway_cpu_pct"))),
        row("gateway RSS MB", lambda f: _fmt(f.get("gateway_rss_mb"))),
        row("broker CPU % / RSS MB", lambda f: (
            f"{_fmt(f.get('broker_cpu_pct'))} / {_fmt(f.get('broker_rss_mb'))}"
            if "broker_cpu_pct" in f else "none")),
    ]  # fmt: skip
    broker = next((f["broker"] for f in fig.values() if f.get("broker")), None)
    lines = [
        f"# gateway bench, {meta['started']}",
        "",
        f"{options.clients:,} clients per strategy, {options.rate:g} events/s for "
        f"{options.duration:g} s, polling every {options.poll_interval:g} s, one "
        f"topic, loopback. Machine `{meta['machine']}`, {meta['cpus']} CPUs, load "
        f"average (1, 5, 15 min) {meta['load_average_before']} before and "
        f"{meta['load_average_after']} after.",
        "",
        f"Gateway: {meta['gateway']}. MQTT broker: {broker or 'not run'}."
        + (" Server CPU and memory: not measured with --url." if options.url else ""),
        "",
        f"Command: `{meta['command']}`",
        "",
        header,
        rule,
        *rows,
        "",
        "Latency runs from the producer's send (before its HTTP publish) to the "
        "client's read. Bytes are counted at the sockets between the first and "
        "the last event published, HTTP headers and WebSocket and MQTT framing "
        "included, keepalives too; connection set-up is not. MQTT clients "
        "subscribe at QoS 1 (the topic is under `fixtures/`), so every delivery "
        "is answered with a PUBACK, which is the client-to-server traffic counted.",
        "",
        f"## Monthly cost on AWS list prices ({cost['region']}, prices of "
        f"{cost['prices_taken_on']}, to be checked)",
        "",
        f"Every user receives {options.rate:g} events/s of {cost['event_bytes']} "
        f"bytes all month; polling every {options.poll_interval:g} s. HTTP API "
        "requests for polling; WebSocket API messages and connection minutes; "
        "IoT Core messages and connection minutes. No free tier, data transfer "
        "or compute: see `clients/cost.py`.",
        "",
        "| users | " + " | ".join(_LABELS[n] for n in ("poll", "ws", "mqtt")) + " |",
        "|---|---|---|---|",
    ]
    for users, costs in cost["by_users"].items():
        cells = [f"${costs[n]['total_usd']:,.0f}" for n in ("poll", "ws", "mqtt")]
        lines.append(f"| {int(users):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(
    out: Path, options: Options, results: list[StrategyResult], cost: Any
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    names = [r.strategy for r in results]

    # Latency: the share of deliveries within each delay.
    figure, axes = plt.subplots(figsize=(7, 4))
    for result in results:
        values = sorted(result.latencies_ms)
        if not values:
            continue
        shares = [(i + 1) / len(values) for i in range(len(values))]
        step = max(1, len(values) // 4000)
        axes.plot(
            values[::step],
            shares[::step],
            label=_LABELS[result.strategy],
            color=_COLORS[result.strategy],
        )
    axes.set_xscale("log")
    axes.set_xlabel("delay from publish to receipt, ms (log)")
    axes.set_ylabel("share of deliveries")
    axes.set_title("Latency distribution")
    axes.grid(True, which="both", alpha=0.3)
    _legend(axes)
    files.append(_save(figure, out / "latency.png", plt))

    # Bytes per client per event, both ways.
    figure, axes = plt.subplots(figsize=(7, 4))
    per_event = [r.figures["bytes_per_client_per_event"] for r in results]
    xs = range(len(names))
    axes.bar(xs, [p["received"] for p in per_event], label="server to client")
    axes.bar(
        xs,
        [p["sent"] for p in per_event],
        bottom=[p["received"] for p in per_event],
        label="client to server",
    )
    axes.set_xticks(list(xs), [_LABELS[n] for n in names])
    axes.set_ylabel("bytes per client per event")
    axes.set_title("Bytes on the wire per event (headers and framing included)")
    axes.legend()
    files.append(_save(figure, out / "bytes_per_event.png", plt))

    # Gateway (and broker) CPU over the publishing phase, when it was measured
    # (never with --url: the gateway runs elsewhere).
    if any("gateway_cpu_pct" in sample for r in results for sample in r.load):
        files.append(_save(_server_load(results, plt), out / "server_load.png", plt))

    # Monthly cost against users.
    figure, axes = plt.subplots(figsize=(7, 4))
    users = [int(u) for u in cost["by_users"]]
    for name in ("poll", "ws", "mqtt"):
        totals = [cost["by_users"][str(u)][name]["total_usd"] for u in users]
        axes.plot(users, totals, marker="o", label=_LABELS[name], color=_COLORS[name])
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("users")
    axes.set_ylabel("USD per month (log)")
    axes.set_title(
        f"AWS list-price cost, {options.rate:g} events/s, "
        f"polling every {options.poll_interval:g} s"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    files.append(_save(figure, out / "monthly_cost.png", plt))
    return files


def _server_load(results: list[StrategyResult], plt: Any) -> Any:
    """The figure of the gateway's (and broker's) CPU over publishing."""
    figure, axes = plt.subplots(figsize=(7, 4))
    for result in results:
        times = [s["t"] for s in result.load]
        for role, style in (("gateway", "-"), ("broker", "--")):
            key = f"{role}_cpu_pct"
            if times and all(key in s for s in result.load):
                values = [s[key] for s in result.load]
                axes.plot(
                    times,
                    values,
                    style,
                    color=_COLORS[result.strategy],
                    label=f"{_LABELS[result.strategy]}: {role}",
                )
    axes.set_xlabel("seconds into publishing")
    axes.set_ylabel("CPU, % of one core")
    axes.set_title("Server load")
    axes.grid(True, alpha=0.3)
    _legend(axes, fontsize="small")
    return figure


def _legend(axes: Any, **options: Any) -> None:
    """A legend, unless nothing was drawn (matplotlib would warn)."""
    if axes.get_legend_handles_labels()[0]:
        axes.legend(**options)


def _save(figure: Any, path: Path, plt: Any) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name


def _settings(options: Options) -> dict[str, Any]:
    """The options as the report shows them: paths as text, secrets masked."""
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()
    }
    if options.api_key:
        settings["api_key"] = MASK
    for name in ("url", "mqtt_url"):
        if settings[name]:
            settings[name] = masked_url(settings[name])
    return settings


def write_report(
    options: Options, meta: dict[str, Any], results: list[StrategyResult]
) -> str:
    """Write ``report.json``, ``report.md`` and the PNGs; return the Markdown."""
    out = options.out
    cost = _cost_section(options, results)
    settings = _settings(options)
    plots = _plots(out, options, results, cost)
    report = {
        "meta": meta,
        "settings": settings,
        "strategies": {r.strategy: r.figures for r in results},
        "load_samples": {r.strategy: r.load for r in results},
        "cost": cost,
        "plots": plots,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(options, meta, results, cost)
    markdown += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    (out / "report.md").write_text(markdown)
    return markdown
