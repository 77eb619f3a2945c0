"""Fixtures of the fault suite: the processes a scenario starts, stopped by PID whatever happens,
and the scenarios' report lines gathered into the terminal summary."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.harness import connector_settings
from tests.faults.proxy import FaultProxy
from tests.servers import ConnectorProcess, Sink, running, wait_until

_LINES: list[str] = []


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    with running(Sink(tmp_path)) as server:
        yield server


@pytest.fixture
def proxies() -> Iterator[Callable[[int], FaultProxy]]:
    """``proxies(port)`` starts a fault proxy in front of ``port``; all stop at the end."""
    started: list[FaultProxy] = []

    def start(port: int) -> FaultProxy:
        proxy = FaultProxy(port)
        started.append(proxy)
        proxy.start()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


StartConnector = Callable[..., ConnectorProcess]


@pytest.fixture
def connectors(tmp_path: Path) -> Iterator[StartConnector]:
    """``connectors(cloud_url, sink, protocol=..., **extra)`` starts a connector and waits for
    it to connect; every one started is SIGKILLed by PID at the end."""
    started: list[ConnectorProcess] = []

    def start(
        cloud_url: str, sink: Sink, protocol: str = "websocket", **extra: object
    ) -> ConnectorProcess:
        settings = connector_settings(cloud_url, sink, tmp_path, protocol, **extra)
        process = ConnectorProcess(tmp_path, settings, str(settings["connector_id"]))
        started.append(process)
        process.start()
        wait_until(lambda: "connected to" in process.output(), 30, "the connector to connect")
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop(signal.SIGKILL)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _LINES.extend(str(value) for name, value in report.user_properties if name == "fault")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LINES:
        terminalreporter.section("fault scenarios")
        for line in _LINES:
            terminalreporter.write_line(line)
