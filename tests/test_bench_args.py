"""The benchmark commands: bad arguments, secrets in reports, stopping on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support import timeout

from clients import bench, fanout_bench
from clients._bench_report import write_report
from clients._report import write_json

#: The ``gateway`` command of the environment the tests run in.
GATEWAY = str(Path(sys.executable).parent / "gateway")


def run_gateway(*args: str, seconds: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``gateway ARGS`` to its end; its output as text."""
    return subprocess.run(
        [GATEWAY, *args],
        capture_output=True,
        text=True,
        timeout=timeout(seconds),
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "args", "flag"),
    [
        ("poll-bench", ["--clients", "0"], "--clients"),
        ("poll-bench", ["--clients", "-1"], "--clients"),
        ("poll-bench", ["--rate", "0"], "--rate"),
        ("poll-bench", ["--duration", "0"], "--duration"),
        ("poll-bench", ["--runs", "0"], "--runs"),
        ("poll-bench", ["--interval", "0"], "--interval"),
        ("poll-bench", ["--warmup", "-1"], "--warmup"),
        ("poll-bench", ["--url", "http://127.0.0.1:9"], "--api-key"),
        ("poll-bench", ["--url", "notaurl", "--api-key", "x"], "--url"),
        ("bench", ["--warmup", "-1"], "--warmup"),
        ("bench", ["--out", "{file}/report"], "--out"),
        ("bench", ["--url", "notaurl", "--api-key", "x"], "--url"),
        ("bench", ["--url", "https://127.0.0.1", "--api-key", "x"], "--url"),
        ("bench", ["--url", "http://127.0.0.1:99999", "--api-key", "x"], "--url"),
        ("bench", ["--url", "http://127.0.0.1:9/api", "--api-key", "x"], "--url"),
        ("bench", ["--mqtt-url", "mqtt://127.0.0.1:1884"], "--mqtt-url"),
        (
            "bench",
            ["--url", "http://127.0.0.1:9", "--api-key", "x", "--mqtt-url", "nope"],
            "--mqtt-url",
        ),
    ],
)
def test_bad_argument_is_one_line_naming_the_flag(
    command: str, args: list[str], flag: str, tmp_path: Path
) -> None:
    """A bad argument ends the command at once, with one line naming the flag."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    args = [arg.replace("{file}", str(a_file)) for arg in args]
    if command == "bench":
        args.append("--no-progress")
    result = run_gateway(command, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    messages = [
        line
        for line in result.stderr.splitlines()
        if line.startswith(f"gateway {command}:")
    ]
    assert len(messages) == 1, result.stderr
    assert flag in messages[0]


def test_bench_report_masks_the_api_key_and_passwords(tmp_path: Path) -> None:
    """report.json and report.md show neither the API key nor a broker password."""
    key, password = "key-that-must-not-show", "password-that-must-not-show"
    options = bench.parse_args(
        [
            "--url",
            "http://127.0.0.1:9",
            f"--api-key={key}",
            "--mqtt-url",
            f"mqtt://bench:{password}@127.0.0.1:1884",
            "--clients",
            "2",
            "--duration",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    fleet = bench.Fleet("ws")
    figures = bench._figures(options, fleet, 10, 1.0, (0, 0, 0), (0, 0, 0), 20)
    figures["broker"] = None
    result = bench.StrategyResult("ws", figures, [], [{"t": 1.0}])
    meta = {
        "started": "2026-01-01T00:00:00",
        "machine": "test",
        "cpus": 2,
        "load_average_before": [0.0, 0.0, 0.0],
        "load_average_after": [0.0, 0.0, 0.0],
        "command": options.command,
        "gateway": options.url,
    }

    write_report(options, meta, [result])

    for name in ("report.json", "report.md"):
        text = (tmp_path / name).read_text()
        assert key not in text and password not in text, name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["api_key"] == "***"
    assert report["settings"]["mqtt_url"] == "mqtt://bench:***@127.0.0.1:1884"
    assert "'--api-key=***'" in report["settings"]["command"]
    # Nothing measured the gateway's CPU, so there is no plot of it.
    assert "server_load.png" not in report["plots"]
    assert "not measured with --url" in (tmp_path / "report.md").read_text()


def test_fanout_report_masks_the_broker_password(tmp_path: Path) -> None:
    """fanout-bench's JSON shows the --mqtt-url without its password."""
    options = fanout_bench.parse_args(
        [
            "--servers",
            "gateway-mqtt",
            "--mqtt-url",
            "mqtt://bench:s3cret@127.0.0.1:1884",
        ]
    )
    path = tmp_path / "fanout.json"

    write_json(path, {}, options)

    assert "s3cret" not in path.read_text()
    document = json.loads(path.read_text())
    assert document["options"]["mqtt_url"] == "mqtt://bench:***@127.0.0.1:1884"


def _listening(process: psutil.Process) -> bool:
    """Whether ``process`` listens on a TCP port."""
    try:
        return any(
            conn.status == psutil.CONN_LISTEN
            for conn in process.net_connections(kind="tcp")
        )
    except psutil.Error:
        return False


@pytest.mark.parametrize(
    "args",
    [
        ["poll-bench", "--clients", "5", "--duration", "10", "--runs", "1"],
        [
            "bench",
            "--strategies",
            "mqtt",
            "--clients",
            "5",
            "--duration",
            "10",
            "--no-progress",
        ],
    ],
    ids=["poll-bench", "bench-mqtt"],
)
def test_sigterm_stops_the_processes_the_benchmark_started(
    args: list[str], tmp_path: Path
) -> None:
    """SIGTERM stops the benchmark as Ctrl-C does: its gateway and broker go too."""
    if args[0] == "bench":
        args = [*args, "--out", str(tmp_path / "report")]
    process = subprocess.Popen(
        [GATEWAY, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    children: list[psutil.Process] = []
    try:
        # Measuring has begun once a child of the benchmark listens.
        deadline = time.monotonic() + timeout(30)
        while time.monotonic() < deadline:
            children = psutil.Process(process.pid).children(recursive=True)
            if any(_listening(child) for child in children):
                break
            time.sleep(0.2)
        else:
            pytest.fail("no child of the benchmark listened within 30 s")
        time.sleep(0.5)
        children = psutil.Process(process.pid).children(recursive=True)

        process.send_signal(signal.SIGTERM)

        _, stderr = process.communicate(timeout=timeout(15))
        _, alive = psutil.wait_procs(children, timeout=timeout(10))
        assert alive == [], alive
        assert process.returncode != 0
        assert "Traceback" not in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for child in children:
            # Gone already when the test passed; a failed one cleans up here.
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
