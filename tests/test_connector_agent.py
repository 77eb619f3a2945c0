"""The connector as an agent (issue 15): one line to forward, every key as a flag and a
variable, delivery lines, staying up through answers that are not the cloud's refusal, its own
health and metrics, log format and level, bad input.

End to end with the real cloud under uvicorn, the real ``webhook-connect connector`` process
and the real sink; a real little HTTP server plays the proxy that answers 403 pages. The flag
derivation, refusal rule, printer and metrics text are checked as the pure pieces they are.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import click
import httpx
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field, PositiveInt

from tests.servers import REPO, Cloud, Sink, free_port, running, wait_until
from webhook_connect import cli
from webhook_connect.connector import main as connector_main
from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.delivery import DeliveryResult
from webhook_connect.connector.flags import flag_specs, value_kind
from webhook_connect.connector.metrics import Metrics, answer, health, render
from webhook_connect.connector.printer import LinePrinter
from webhook_connect.connector.refusal import describe_answer, token_refusal
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.frames import WireMessage
from webhook_connect.shared.policy import Outcome

TOKEN = "agent-token-0123456789"
CHANNEL = {
    "channel": "dev",
    "channel_token": TOKEN,
    "ack_timeout_seconds": 5,
    "retry_delay_seconds": 0.2,
    "max_delivery_attempts": 3,
}
WEBHOOKS = {"github": {"module": "webhook_connect", "module-config": CHANNEL}}
ANSI = "\x1b["


@pytest.fixture(params=["websocket", "sse", "long_poll"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- the agent as a process -------------------------------------------------------------------


class Agent:
    """``webhook-connect connector`` started with flags only (no file unless given)."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = env or {}
        self.log = workdir / f"agent-{free_port()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "webhook_connect", "connector", *self.args]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_CONNECT_")}
        env = {**clean, "PYTHONPATH": str(REPO), **self.env}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait(self, timeout: float = 20) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def base_flags(cloud_url: str, workdir: Path, protocol: str = "websocket") -> list[str]:
    return [
        "--cloud-url",
        cloud_url,
        "--channel",
        "dev",
        "--token",
        TOKEN,
        "--protocol",
        protocol,
        "--state-dir",
        str(workdir / "state"),
        "--reconnect-delay-seconds",
        "0.2",
        "--max-reconnect-delay-seconds",
        "0.5",
    ]


def post(cloud: Cloud, body: bytes = b'{"n": 1}') -> None:
    answer = httpx.post(f"{cloud.url}/webhook/github", content=body, timeout=5)
    assert answer.status_code == 202, answer.text


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture
def sqlite_cloud(tmp_path: Path) -> Iterator[Cloud]:
    webhooks = tmp_path / "webhooks.json"
    webhooks.write_text(json.dumps(WEBHOOKS))
    with running(Cloud(f"sqlite:///{tmp_path / 'buffer.db'}", webhooks, tmp_path)) as server:
        yield server


# --- one line to forward ----------------------------------------------------------------------


def test_one_line_forwards_with_no_file(
    sqlite_cloud: Cloud, sink: Sink, tmp_path: Path, protocol: str
) -> None:
    """``--forward-to`` is the whole target; not a terminal: JSON lines, no colour codes."""
    flags = base_flags(sqlite_cloud.url, tmp_path, protocol)
    with running(Agent(tmp_path, *flags, "--forward-to", f"{sink.url}hook")) as agent:
        wait_until(lambda: "connected to" in agent.output(), 20, "the agent to connect")
        post(sqlite_cloud, b'{"one": "line"}')
        wait_until(lambda: sink.records(), 20, "the webhook at the sink")
        wait_until(lambda: '"delivery"' in agent.output(), 5, "its delivery line")
    [record] = sink.records()
    assert record["path"] == "/hook"
    output = agent.output()
    assert ANSI not in output
    [line] = [line for line in json_lines(output) if line.get("event") == "delivery"]
    assert (line["status"], line["outcome"], line["level"]) == (200, "delivered", "info")
    assert line["message"].startswith("200 POST /hook ")
    assert line["target"] == f"{sink.url}hook"


def test_text_format_delivery_line_names_status_method_path_and_time(
    sqlite_cloud: Cloud, sink: Sink, tmp_path: Path
) -> None:
    flags = base_flags(sqlite_cloud.url, tmp_path)
    args = (*flags, "--forward-to", f"{sink.url}hook", "--log-format", "text")
    with running(Agent(tmp_path, *args)) as agent:
        wait_until(lambda: "connected to" in agent.output(), 20, "the agent to connect")
        post(sqlite_cloud)
        wait_until(lambda: " -> " in agent.output(), 20, "its delivery line")
    [line] = [line for line in agent.output().splitlines() if " -> " in line]
    stamp, status, method, path, ms, unit, *_ = line.split(" ")
    assert (status, method, path, unit) == ("200", "POST", "/hook", "ms")
    assert float(ms) >= 0
    assert ANSI not in line


def test_a_failed_delivery_is_a_warning_with_its_cause_and_info_lines_can_be_silenced(
    sqlite_cloud: Cloud, tmp_path: Path
) -> None:
    """Nothing listens at the target: at --log-level warning only the failures are printed,
    each with what went wrong."""
    dead = f"http://127.0.0.1:{free_port()}/hook"
    target = {"url": dead, "retry_max_attempts": 1, "timeout_seconds": 2}
    flags = base_flags(sqlite_cloud.url, tmp_path)
    args = (*flags, "--default-target", json.dumps(target), "--log-level", "warning")
    with running(Agent(tmp_path, *args)) as agent:
        wait_until(lambda: httpx.get(f"{sqlite_cloud.url}/health", timeout=2).status_code == 200, 5)
        post(sqlite_cloud)
        wait_until(lambda: '"delivery"' in agent.output(), 20, "a failed delivery line")
    lines = json_lines(agent.output())
    assert not [line for line in lines if line["level"] == "info"]
    failure = next(line for line in lines if line.get("event") == "delivery")
    assert (failure["level"], failure["outcome"], failure["status"]) == ("warning", "retry", None)
    assert failure["error"]  # the cause, as the delivery reported it
    assert failure["message"].startswith("ERR POST /hook ")
    assert f"(retry): {failure['error']}" in failure["message"]


# --- staying up -------------------------------------------------------------------------------


class Gate:
    """A real little HTTP server that answers every request as a corporate proxy refusing it
    would: 403 with an HTML page (or ``status``/``body`` given)."""

    def __init__(self, port: int, status: int = 403, body: bytes = b"", kind: str = "") -> None:
        self.port = port
        self.status = status
        self.body = body or b"<html><body><h1>Access denied</h1> by policy</body></html>"
        self.kind = kind or "text/html"
        self.requests = 0
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                gate.requests += 1
                self.send_response(gate.status)
                self.send_header("Content-Type", gate.kind)
                self.send_header("Content-Length", str(len(gate.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(gate.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (403, b"", ""),  # a proxy's HTML page
        (404, b"<html>no such route</html>", "text/html"),  # an ingress mid-deploy
        (502, b"Bad Gateway", "text/plain"),
        (401, b"<html>Sign in to the corporate portal</html>", "text/html"),  # not the cloud's
    ],
)
def test_answers_that_are_not_the_clouds_refusal_are_retried_until_the_cloud_answers(
    sink: Sink,
    tmp_path: Path,
    protocol: str,
    status: int,
    body: bytes,
    kind: str,
) -> None:
    """Whatever stands on the cloud's address first, the agent keeps dialling, says what came
    back, and delivers once the real cloud is there."""
    port = free_port()
    webhooks = tmp_path / "webhooks.json"
    webhooks.write_text(json.dumps(WEBHOOKS))
    cloud = Cloud(f"sqlite:///{tmp_path / 'buffer.db'}", webhooks, tmp_path)
    cloud.port = port
    flags = base_flags(cloud.url, tmp_path, protocol)
    agent = Agent(tmp_path, *flags, "--forward-to", sink.url, "--log-format", "text")
    try:
        with running(Gate(port, status, body, kind)) as gate:
            agent.start()
            wait_until(lambda: gate.requests >= 3, 20, "the agent to dial three times")
            assert agent.process is not None and agent.process.poll() is None
        said = [line for line in agent.output().splitlines() if "cannot connect" in line]
        assert said and f"HTTP {status} ({kind or 'text/html'})" in said[0]
        assert "not the cloud's refusal of the token" in said[0]
        with running(cloud):
            wait_until(lambda: "connected to" in agent.output(), 20, "the agent to get in")
            post(cloud)
            wait_until(lambda: sink.records(), 20, "the webhook at the sink")
    finally:
        agent.stop()


def test_the_clouds_refusal_of_the_token_ends_the_agent_with_a_clear_line(
    sqlite_cloud: Cloud, sink: Sink, tmp_path: Path, protocol: str
) -> None:
    flags = base_flags(sqlite_cloud.url, tmp_path, protocol)
    flags[flags.index(TOKEN)] = "wrong-token-0123456789"
    agent = Agent(tmp_path, *flags, "--forward-to", sink.url, "--log-format", "text")
    try:
        agent.start()
        assert agent.wait(20) == 1
    finally:
        agent.stop()
    [line] = [line for line in agent.output().splitlines() if "refused" in line]
    assert "the cloud refused the token" in line
    assert "check the token" in line


def test_refusal_rule() -> None:
    ours = b'{"error": "unauthorized", "detail": "invalid token or channel"}'
    assert token_refusal(401, ours) == "unauthorized: invalid token or channel"
    core = b'{"detail": "Invalid channel token"}'
    assert token_refusal(401, core) == "Invalid channel token"
    for status, body in [
        (401, b"<html>login</html>"),  # a portal, not the cloud
        (403, ours),  # only a 401 is the token's refusal
        (404, b'{"error": "unknown_group"}'),
        (401, b'{"error": "something_else"}'),
        (401, b"[]"),
        (503, b""),
    ]:
        assert token_refusal(status, body) is None, (status, body)
    assert (
        describe_answer(403, b"", "text/html; charset=utf-8") == "HTTP 403 (text/html), empty body"
    )
    long = describe_answer(502, b"x" * 500)
    assert long.startswith("HTTP 502: b'xxx") and long.endswith("...")


# --- health and metrics -----------------------------------------------------------------------


def test_health_and_metrics_follow_the_connection_and_the_deliveries(
    sink: Sink, tmp_path: Path
) -> None:
    webhooks = tmp_path / "webhooks.json"
    webhooks.write_text(json.dumps(WEBHOOKS))
    cloud = Cloud(f"sqlite:///{tmp_path / 'buffer.db'}", webhooks, tmp_path)
    metrics_port = free_port()
    flags = base_flags(cloud.url, tmp_path)
    args = (*flags, "--forward-to", sink.url, "--metrics-port", str(metrics_port))
    base = f"http://127.0.0.1:{metrics_port}"
    with running(Agent(tmp_path, *args)) as agent:
        # No cloud yet: the endpoint answers, and says so.
        wait_until(lambda: httpx.get(f"{base}/health", timeout=2), 20, "the health endpoint")
        down = httpx.get(f"{base}/health", timeout=2)
        assert down.status_code == 503
        assert down.json()["connected"] is False
        with running(cloud):
            wait_until(lambda: httpx.get(f"{base}/health", timeout=2).status_code == 200, 20, "up")
            post(cloud)
            post(cloud)
            wait_until(lambda: len(sink.records()) == 2, 20, "two deliveries")
            wait_until(lambda: httpx.get(f"{base}/health", timeout=2).json()["last_delivery"], 5)
            up = httpx.get(f"{base}/health", timeout=2).json()
            scrape = httpx.get(f"{base}/metrics", timeout=2)
        assert up["connected"] is True and up["channel"] == "dev"
        assert up["last_delivery"]["outcome"] == "delivered"
        assert up["last_delivery"]["status"] == 200
        assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = scrape.text
        assert 'webhook_connect_connector_deliveries_total{outcome="delivered"} 2' in text
        assert "webhook_connect_connector_delivery_seconds_count 2" in text
        assert 'webhook_connect_connector_delivery_seconds_bucket{le="+Inf"} 2' in text
        assert "webhook_connect_connector_connected 1" in text
        assert "webhook_connect_connector_in_flight 0" in text
        # The cloud went away: unhealthy, and the reconnects are counted.
        wait_until(
            lambda: httpx.get(f"{base}/health", timeout=2).status_code == 503, 20, "down again"
        )
        wait_until(
            lambda: (
                "webhook_connect_connector_reconnects_total 0"
                not in httpx.get(f"{base}/metrics", timeout=2).text
            ),
            20,
            "a reconnect counted",
        )
        assert "webhook_connect_connector_connected 0" in httpx.get(f"{base}/metrics").text
        assert httpx.get(f"{base}/nothing", timeout=2).status_code == 404
    assert agent.output()


def test_metrics_text_and_health_are_computed_from_plain_counters() -> None:
    metrics = Metrics()
    assert health(metrics, "http://c", "dev")[0] == 503
    metrics.up()
    metrics.delivery(Outcome.DELIVERED, 0.003, 200, "")
    metrics.delivery(Outcome.RETRY, 45.0, None, "connection refused")
    metrics.duplicate()
    status, body = health(metrics, "http://c", "dev")
    data = json.loads(body)
    assert status == 200
    assert data["last_delivery"] == {
        "time": data["last_delivery"]["time"],
        "outcome": "retry",
        "status": None,
        "error": "connection refused",
    }
    assert data["deliveries"] == {"delivered": 1, "retry": 1, "rejected": 0, "duplicate": 1}
    text = render(metrics)
    assert 'webhook_connect_connector_delivery_seconds_bucket{le="0.0025"} 0' in text
    assert 'webhook_connect_connector_delivery_seconds_bucket{le="0.005"} 1' in text
    assert 'webhook_connect_connector_delivery_seconds_bucket{le="30.0"} 1' in text
    assert 'webhook_connect_connector_delivery_seconds_bucket{le="+Inf"} 2' in text
    assert "webhook_connect_connector_delivery_seconds_sum 45.003" in text
    assert answer("POST", "/metrics", metrics, "", "").status == 405
    # Every sample line parses as Prometheus text: name{labels} value.
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.startswith("webhook_connect_connector_")
            float(value)


# --- the printer ------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def message(attempt: int = 1) -> WireMessage:
    envelope = Envelope("dev", "github", 0.0, "POST", "/webhook/github", "", (), b"{}")
    return WireMessage("m-1", 1, attempt, "dev", envelope)


async def test_delivery_lines_are_coloured_on_a_terminal_only() -> None:
    ok = DeliveryResult(Outcome.DELIVERED, "http://localhost:3000/hook", 200, seconds=0.012)
    bad = DeliveryResult(Outcome.REJECTED, "http://localhost:3000/hook", 404, seconds=0.002)
    terminal = Terminal()
    printer = LinePrinter(terminal, colour=True)
    printer.delivery(message(), ok)
    printer.delivery(message(), bad)
    printer.flush()
    first, second = terminal.getvalue().splitlines()
    assert " \x1b[32m200\x1b[0m POST /hook 12.0 ms github m-1 -> " in first
    assert " \x1b[31m404\x1b[0m POST /hook " in second and second.endswith("(rejected)")
    plain = io.StringIO()
    printer = LinePrinter(plain)
    printer.delivery(message(), ok)
    printer.flush()
    assert ANSI not in plain.getvalue()


async def test_the_level_decides_what_is_printed_and_json_carries_the_fields() -> None:
    stream = io.StringIO()
    printer = LinePrinter(stream, json_lines=True, level=logging.WARNING)
    printer.delivery(message(), DeliveryResult(Outcome.DELIVERED, "http://h/x", 200))
    failed = DeliveryResult(Outcome.RETRY, "http://h/x", None, "timeout after 30 s", seconds=30)
    printer.delivery(message(2), failed)
    printer.line("duplicate suppressed")
    printer.flush()
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["level"] == "warning" and line["error"] == "timeout after 30 s"
    assert line["message"].endswith("attempt 2 (retry): timeout after 30 s")
    assert line["time"].endswith("Z")


# --- every key as a flag and a variable ---------------------------------------------------------


def test_every_settings_key_is_a_flag_and_a_variable() -> None:
    command = cli.main.commands["connector"]
    options = {param.name: param for param in command.params if isinstance(param, click.Option)}
    for key in ConnectorSettings.model_fields:
        option = options[key]
        assert option.opts == ["--" + key.replace("_", "-")]
        assert option.envvar == "WEBHOOK_CONNECT_" + key.upper()
    assert options["verify_tls"].secondary_opts == ["--no-verify-tls"]
    assert isinstance(options["protocol"].type, click.Choice)
    assert options["max_in_flight"].type is click.INT
    assert options["targets"].type.name == "json"


def test_flag_kinds_come_from_the_field_types() -> None:
    """A key someone adds later gets the right kind of flag with no edit to the CLI."""

    class Later(BaseModel):
        name: str
        count: PositiveInt | None = None
        ratio: float = Field(default=1.0, ge=0)
        enabled: bool = True
        mode: Literal["a", "b"] = "a"
        routes: list[dict[str, str]] = []
        mixed: int | str = 0

    kinds = {spec.key: (spec.kind, spec.choices) for spec in flag_specs(Later.model_fields)}
    assert kinds == {
        "name": ("str", ()),
        "count": ("int", ()),
        "ratio": ("float", ()),
        "enabled": ("bool", ()),
        "mode": ("choice", ("a", "b")),
        "routes": ("json", ()),
        "mixed": ("json", ()),
    }
    assert value_kind(dict[str, int]) == ("json", ())


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Wiring only: the settings the CLI would run with, instead of dialling."""
    seen: list[Any] = []

    def capture(settings: ConnectorSettings, plans: object, **logging_options: str) -> int:
        seen.append((settings, logging_options))
        return 0

    monkeypatch.setattr(connector_main, "run", capture)
    return seen


def invoke(args: list[str], env: dict[str, str]) -> Any:
    clean = {k: None for k in os.environ if k.startswith("WEBHOOK_CONNECT_")}
    return CliRunner().invoke(cli.main, ["connector", *args], env={**clean, **env})


def test_file_then_environment_then_flag(tmp_path: Path, captured: list[Any]) -> None:
    config = tmp_path / "connector.json"
    config.write_text(
        json.dumps(
            {
                "cloud_url": "http://127.0.0.1:9",
                "channel": "dev",
                "token": "t",
                "max_in_flight": 5,
                "group": "file",
                "verify_tls": True,
                "default_target": {"url": "http://127.0.0.1:1/a", "retry_max_attempts": 7},
            }
        )
    )
    env = {
        "WEBHOOK_CONNECT_MAX_IN_FLIGHT": "6",
        "WEBHOOK_CONNECT_GROUP": "env",
        "WEBHOOK_CONNECT_VERIFY_TLS": "false",
        "WEBHOOK_CONNECT_FORWARD_TO": "http://127.0.0.1:2/env",
        "WEBHOOK_CONNECT_LOG_LEVEL": "warning",
    }
    flags = ["--config", str(config), "--group", "flag", "--forward-to", "http://127.0.0.1:3/f"]
    result = invoke(flags, env)
    assert result.exit_code == 0, result.output
    settings, options = captured[-1]
    assert settings.max_in_flight == 6  # env over file
    assert settings.group == "flag"  # flag over env over file
    assert settings.verify_tls is False  # env over file, for a flag pair too
    assert settings.channel == "dev"  # the file where nothing else says
    target = settings.default_target
    assert (target.url, target.retry_max_attempts) == ("http://127.0.0.1:3/f", 7)
    assert options == {"log_format": "auto", "log_level": "warning"}
    result = invoke([*flags, "--verify-tls", "--max-in-flight", "9"], env)
    settings, _ = captured[-1]
    assert (settings.verify_tls, settings.max_in_flight) == (True, 9)  # flag over env
    result = invoke(["--config", str(config)], {})
    settings, _ = captured[-1]
    assert (settings.max_in_flight, settings.group, settings.verify_tls) == (5, "file", True)


def test_no_file_at_all(captured: list[Any]) -> None:
    args = ["--cloud-url", "http://127.0.0.1:9", "--channel", "dev", "--token", "t"]
    result = invoke([*args, "--forward-to", "http://localhost:3000/hook"], {})
    assert result.exit_code == 0, result.output
    settings, _ = captured[-1]
    assert settings.default_target.url == "http://localhost:3000/hook"
    targets = json.dumps({"github": {"url": "http://localhost:3001/gh"}})
    result = invoke(args, {"WEBHOOK_CONNECT_TARGETS": targets})
    assert result.exit_code == 0, result.output
    assert captured[-1][0].target_for("github").url == "http://localhost:3001/gh"


# --- bad input --------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_CONNECT_")}
    return subprocess.run(
        [sys.executable, "-m", "webhook_connect", "connector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "PYTHONPATH": str(REPO), **(env or {})},
    )


ONE_LINER = ["--cloud-url", "http://127.0.0.1:9", "--channel", "dev", "--token", "t"]
TARGET = ["--forward-to", "http://127.0.0.1:9/hook"]


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ([*ONE_LINER, *TARGET, "--max-in-flight", "0"], {}, "--max-in-flight:"),
        ([*ONE_LINER, "--forward-to", "ftp://x/hook"], {}, "--forward-to:"),
        ([*ONE_LINER, *TARGET], {"WEBHOOK_CONNECT_MAX_IN_FLIGHT": "many"}, "MAX_IN_FLIGHT:"),
        ([*ONE_LINER, *TARGET], {"WEBHOOK_CONNECT_MAX_IN_FLIGHT": "-1"}, "MAX_IN_FLIGHT:"),
        ([*ONE_LINER, *TARGET], {"WEBHOOK_CONNECT_ORDERED": "perhaps"}, "_ORDERED:"),
        ([*ONE_LINER, *TARGET], {"WEBHOOK_CONNECT_PROTOCOL": "carrier-pigeon"}, "_PROTOCOL:"),
        ([*ONE_LINER, *TARGET], {"WEBHOOK_CONNECT_TARGETS": "{not json"}, "_TARGETS:"),
        ([*ONE_LINER, *TARGET], {"WEBHOOK_CONNECT_LOG_FORMAT": "xml"}, "_LOG_FORMAT:"),
        (
            [*ONE_LINER[:2], "--token", "t", *TARGET],
            {"WEBHOOK_CONNECT_CHANNEL": "a b"},
            "_CHANNEL:",
        ),
        ([*ONE_LINER], {}, "default_target"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_or_variable_and_exit_2(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "connected to" not in result.stdout  # nothing dialled


@pytest.mark.parametrize(
    "args",
    [
        [*ONE_LINER, *TARGET, "--no-such-flag"],
        [*ONE_LINER, *TARGET, "--max-in-flight", "many"],
        [*ONE_LINER, *TARGET, "--targets", "{not json"],
    ],
)
def test_unknown_flags_and_bad_flag_types_are_clicks_usage_error_exit_2(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert ("No such option" in error) or ("Invalid value for '--" in error)


def test_a_busy_metrics_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(*ONE_LINER, *TARGET, "--metrics-port", str(port), "--log-format", "text")
    assert result.returncode == 1
    assert f"cannot serve health and metrics on 127.0.0.1:{port}" in result.stdout


def test_json_log_lines_are_json(sqlite_cloud: Cloud, sink: Sink, tmp_path: Path) -> None:
    """--log-format json: every line of the agent's output is a JSON object."""
    flags = base_flags(sqlite_cloud.url, tmp_path)
    args = (*flags, "--forward-to", sink.url, "--log-format", "json")
    with running(Agent(tmp_path, *args)) as agent:
        wait_until(lambda: "connected to" in agent.output(), 20, "the agent to connect")
        post(sqlite_cloud)
        wait_until(lambda: '"delivery"' in agent.output(), 20, "its delivery line")
    lines = agent.output().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    assert {json.loads(line)["logger"] for line in lines} >= {
        "webhook_connect.connector",
        "webhook_connect.connector.delivery",
    }


async def test_json_delivery_lines_stay_json_whatever_the_strings_hold() -> None:
    """The JSON line is written out field by field (it is cheaper): every string in it must
    still be escaped."""
    stream = io.StringIO()
    printer = LinePrinter(stream, json_lines=True)
    envelope = Envelope("dev", 'we"ird\\id', 0.0, "POST", "/x", "", (), b"")
    odd = WireMessage('m"1', 1, 2, "dev", envelope)
    cause = 'TLS: "bad"\n\x00é'
    printer.delivery(odd, DeliveryResult(Outcome.REJECTED, 'http://h/a"b?q=1', 404, cause))
    printer.delivery(odd, DeliveryResult(Outcome.DELIVERED, "kafka", None, "", 1, 3.0))
    printer.flush()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["webhook_id"], first["message_id"], first["error"]) == (
        'we"ird\\id',
        'm"1',
        cause,
    )
    assert (first["target"], first["status"], first["level"]) == (
        'http://h/a"b?q=1',
        404,
        "warning",
    )
    assert (second["status"], second["ms"], second["message"][:9]) == (None, 3000.0, "ok POST k")
