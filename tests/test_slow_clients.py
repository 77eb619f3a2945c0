"""Slow and idle client connections (issue 12, defect 2): the request head and body deadlines,
the open-connection cap, against the real cloud; and the pure decisions behind them."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.servers import REPO, Cloud, descriptor_limit, free_port, running, wait_until
from webhook_connect.cli import main
from webhook_connect.cloud.connections import (
    BODY_TIMEOUT,
    DEFAULT_BACKLOG,
    EVICTED,
    HEADER_TIMEOUT,
    RESERVED_DESCRIPTORS,
    ConnectionLimits,
    ConnectionTable,
    LogGate,
    plan_descriptors,
)

TOKEN = "test-token-0123456789"
WEBHOOKS = {
    "blob": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {"channel": "dev", "channel_token": TOKEN},
    },
}
DEADLINE = 1.0  # --header-timeout and --body-timeout of the module's cloud
SLACK = 2.0  # a deadline is checked every 100 ms here; the rest is a busy 2-core machine


# --- the pure decisions ---------------------------------------------------------------------


def test_the_plan_raises_the_soft_limit_as_far_as_the_hard_one_allows() -> None:
    wanted = 1000 + DEFAULT_BACKLOG + RESERVED_DESCRIPTORS
    plan = plan_descriptors(1000, soft=1024, hard=524288)
    assert plan is not None and (plan.max_open, plan.nofile, plan.lowered) == (1000, wanted, False)
    assert plan_descriptors(1000, soft=1024, hard=-1) == plan  # RLIM_INFINITY
    unlimited = plan_descriptors(1000, soft=-1, hard=-1)
    assert unlimited is not None and (unlimited.max_open, unlimited.nofile) == (1000, -1)
    assert plan_descriptors(1000, soft=1 << 20, hard=1 << 20) == replace(plan, nofile=1 << 20)


def test_the_plan_lowers_cap_and_backlog_to_fit_a_low_limit() -> None:
    plan = plan_descriptors(1000, soft=256, hard=256)
    assert plan is not None and plan.lowered and plan.nofile == 256
    # Everything libuv may accept in one go still fits: no accept() ever fails.
    assert plan.max_open + plan.backlog + RESERVED_DESCRIPTORS <= 256
    assert plan.max_open >= 100 and plan.backlog >= 16
    small = plan_descriptors(10, soft=256, hard=256)
    assert small is not None and (small.max_open, small.lowered) == (10, False)
    assert small.max_open + small.backlog + RESERVED_DESCRIPTORS == 256
    assert plan_descriptors(1000, soft=64, hard=64) is None


def test_the_table_evicts_the_longest_waiting_connection_with_no_request_in_progress() -> None:
    table: ConnectionTable[str] = ConnectionTable(ConnectionLimits(10, 30, max_open=3))
    for name in ("idle", "busy", "answered"):
        assert table.open(name, now=0).admitted
    table.message_begun("busy", 1)
    table.head_complete("busy", 1)
    table.message_begun("answered", 1)
    table.head_complete("answered", 1)
    table.message_complete("answered")
    table.response_complete("answered")  # idle again, kept alive
    first = table.open("new", now=2)
    assert (first.admitted, first.evict) == (True, "idle")
    second = table.open("newer", now=3)
    assert (second.admitted, second.evict) == (True, "answered")
    table.message_begun("new", 3)
    table.head_complete("new", 3)
    table.message_begun("newer", 3)
    table.head_complete("newer", 3, upgrade=True)  # a WebSocket: never evicted
    assert table.open("refused", now=4).admitted is False
    assert len(table) == 3 and "refused" not in table


def test_the_table_names_the_deadline_that_ran_out() -> None:
    table: ConnectionTable[str] = ConnectionTable(ConnectionLimits(10, 30, max_open=10))
    table.open("silent", now=0)
    table.open("slow-head", now=0)
    table.message_begun("slow-head", 5)  # the first request's head counts from connect
    table.open("slow-body", now=0)
    table.message_begun("slow-body", 1)
    table.head_complete("slow-body", 2)
    table.open("kept-alive", now=0)
    table.message_begun("kept-alive", 1)
    table.head_complete("kept-alive", 1)
    table.message_complete("kept-alive")
    table.response_complete("kept-alive")
    table.open_stream("websocket")
    assert table.expired(9.9) == []
    assert table.expired(10) == [("silent", HEADER_TIMEOUT), ("slow-head", HEADER_TIMEOUT)]
    assert table.expired(32) == [
        ("silent", HEADER_TIMEOUT),
        ("slow-head", HEADER_TIMEOUT),
        ("slow-body", BODY_TIMEOUT),
    ]
    # Idle between requests is uvicorn's keep-alive timeout's business; the next head's
    # deadline starts with its first byte.
    table.message_begun("kept-alive", 100)
    assert ("kept-alive", HEADER_TIMEOUT) not in table.expired(109)
    assert ("kept-alive", HEADER_TIMEOUT) in table.expired(110)
    table.closed("silent")
    assert "silent" not in [key for key, _ in table.expired(1000)]


def test_the_log_gate_lets_one_line_a_second_through_and_counts_the_rest() -> None:
    gate = LogGate(interval=1.0)
    assert gate.allow(100.0) == 0
    assert [gate.allow(100.0 + i / 10) for i in range(1, 10)] == [None] * 9
    assert gate.allow(101.0) == 9
    assert gate.allow(105.0) == 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--header-timeout", "-1"),
        ("--header-timeout", "0"),
        ("--body-timeout", "0"),
        ("--body-timeout", "nan"),
        ("--max-open-connections", "0"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_and_exit_2(flag: str, value: str) -> None:
    result = CliRunner().invoke(main, ["cloud", flag, value])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.output


def test_the_environment_variables_are_validated_too() -> None:
    env = {"WEBHOOK_CONNECT_BODY_TIMEOUT": "-5"}
    result = CliRunner().invoke(main, ["cloud"], env=env)
    assert result.exit_code == 2 and "--body-timeout" in result.output


def test_a_descriptor_limit_too_low_for_the_cloud_is_one_line_and_exit_2(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "webhook_connect", "cloud", "--port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, preexec_fn=descriptor_limit(64)
    )
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "--max-open-connections" in lines[0] and "ulimit -n 64" in lines[0]


# --- against the real cloud ------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """A cloud with one-second deadlines for the request head and body."""
    workdir = tmp_path_factory.mktemp("slow")
    path = workdir / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    storage = f"sqlite:///{workdir / 'buffer.db'}"
    timeouts = ("--header-timeout", str(DEADLINE), "--body-timeout", str(DEADLINE))
    with running(Cloud(storage, path, workdir, *timeouts)) as server:
        yield server


def dial(cloud: Cloud) -> socket.socket:
    return socket.create_connection(("127.0.0.1", cloud.port), timeout=5)


def until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    received = b""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {timeout}s; received {received!r}")


def scrape(cloud: Cloud) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(f"{cloud.url}/metrics", headers={"Connection": "close"})
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def closed_total(cloud: Cloud, reason: str) -> float:
    key = ("webhook_connect_connections_closed_total", (("reason", reason),))
    return scrape(cloud).get(key, 0.0)


HEAD = (
    b"POST /webhook/blob HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 64\r\n\r\n"
)


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(
    quick_cloud: Cloud,
) -> None:
    before = closed_total(quick_cloud, HEADER_TIMEOUT)
    with dial(quick_cloud) as sock:
        opened = time.monotonic()
        assert until_closed(sock, DEADLINE + SLACK) == b""  # nothing asked, nothing answered
        assert time.monotonic() - opened >= DEADLINE * 0.9
    wait_until(lambda: closed_total(quick_cloud, HEADER_TIMEOUT) > before, what="counted")
    log = quick_cloud.log.read_text()
    assert "no complete request head within 1.0s" in log


def test_half_a_request_head_is_answered_408_and_closed(quick_cloud: Cloud) -> None:
    with dial(quick_cloud) as sock:
        opened = time.monotonic()
        sock.sendall(HEAD[:40])
        answer = until_closed(sock, DEADLINE + SLACK)
        assert time.monotonic() - opened >= DEADLINE * 0.9
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in answer and answer.endswith(b'{"error":"header_timeout"}')


def test_a_body_trickled_byte_by_byte_is_cut_off_with_408_and_not_stored(
    quick_cloud: Cloud,
) -> None:
    before = closed_total(quick_cloud, BODY_TIMEOUT)
    with dial(quick_cloud) as sock:
        sock.sendall(HEAD)
        head_sent = time.monotonic()
        received = b""
        # One byte every 100 ms would take 6.4 s: the deadline is 1 s.
        while time.monotonic() - head_sent < DEADLINE + SLACK:
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                received = until_closed(sock, SLACK)
                break
        else:
            raise AssertionError("the trickled body was never cut off")
        assert time.monotonic() - head_sent >= DEADLINE * 0.9
    assert received.startswith(b"HTTP/1.1 408 ") and received.endswith(b'{"error":"body_timeout"}')
    wait_until(lambda: closed_total(quick_cloud, BODY_TIMEOUT) > before, what="counted")
    assert "no complete request body within 1.0s" in quick_cloud.log.read_text()
    # Nothing half-received was stored: the channel holds only what other tests completed.
    depth = scrape(quick_cloud)[("webhook_connect_queue_depth", (("channel", "dev"),))]
    answer = httpx.post(f"{quick_cloud.url}/webhook/blob", content=b"complete")
    assert answer.status_code == 202
    after = scrape(quick_cloud)[("webhook_connect_queue_depth", (("channel", "dev"),))]
    assert after == depth + 1


def test_a_body_sent_at_a_normal_pace_within_the_deadline_is_accepted(quick_cloud: Cloud) -> None:
    with dial(quick_cloud) as sock:
        sock.sendall(HEAD)
        for _ in range(4):  # 64 bytes over about 0.3 s
            sock.sendall(b"y" * 16)
            time.sleep(0.1)  # the pace of the sender under test, not a wait for the server
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 202 ")


def test_a_kept_alive_connection_may_idle_longer_than_the_head_deadline(
    quick_cloud: Cloud,
) -> None:
    """Between requests uvicorn's keep-alive timeout (5 s) applies; the head's starts with
    the next request."""
    with httpx.Client(base_url=quick_cloud.url) as client:
        assert client.post("/webhook/blob", content=b"1").status_code == 202
        idle_until = time.monotonic() + DEADLINE * 2
        while time.monotonic() < idle_until:
            time.sleep(0.1)  # being idle is what is tested
        answer = client.post("/webhook/blob", content=b"2")
        assert answer.status_code == 202
        assert client.post("/webhook/blob", content=b"3").status_code == 202


async def test_streams_websockets_and_long_polls_outlive_the_deadlines(
    quick_cloud: Cloud,
) -> None:
    ws_url = quick_cloud.url.replace("http://", "ws://") + f"/connect/stream/dev?token={TOKEN}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        httpx.AsyncClient(base_url=quick_cloud.url, timeout=20) as client,
        connect(ws_url) as ws,
        client.stream("GET", "/connect/stream/dev/sse?group=sse", headers=auth) as sse,
    ):
        assert json.loads(await ws.recv())["type"] == "connected"
        assert sse.status_code == 200
        lines = sse.aiter_lines()
        async for line in lines:
            if line.startswith("event: connected"):
                break
        started = time.monotonic()
        poll = await client.get(
            "/connect/stream/dev/poll", params={"timeout": 3, "group": "poll"}, headers=auth
        )
        # The long poll ran its 3 s, three times the deadlines, and answered "nothing yet".
        assert poll.status_code == 204 and time.monotonic() - started >= 2.5
        answer = await client.post("/webhook/blob", content=b"after the wait")
        message_id = answer.json()["message_id"]
        async with asyncio.timeout(10):  # earlier tests' messages come first
            while json.loads(await ws.recv()).get("message_id") != message_id:
                pass  # the WebSocket is still open
            async for line in lines:  # and so is the SSE stream
                if line.startswith("id:") and message_id in line:
                    break


def cloud_descriptors(cloud: Cloud) -> int:
    assert cloud.process is not None
    return len(os.listdir(f"/proc/{cloud.process.pid}/fd"))


def test_400_slow_sockets_under_a_256_descriptor_limit_leave_room_for_a_webhook(
    tmp_path: Path,
) -> None:
    """What a user expects: the slow sockets give way, a webhook POST gets 202 at once.

    Default deadlines (10 s): what frees room here is the cap, not a deadline."""
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    cloud = Cloud(f"sqlite:///{tmp_path / 'buffer.db'}", path, tmp_path, nofile=256)
    sockets: list[socket.socket] = []
    try:
        with running(cloud):
            for n in range(400):
                sock = dial(cloud)
                sockets.append(sock)
                if n % 2:
                    sock.sendall(HEAD[:30])  # half a head
            started = time.monotonic()
            answer = httpx.post(f"{cloud.url}/webhook/blob", content=b"through", timeout=5)
            assert answer.status_code == 202
            assert time.monotonic() - started < 5  # not after a deadline freed room
            assert cloud_descriptors(cloud) < 256

            def evicted() -> float:
                return closed_total(cloud, EVICTED)

            plan = plan_descriptors(1000, soft=256, hard=256)
            assert plan is not None
            # Every connection beyond the cap closed the oldest silent one.
            wait_until(lambda: evicted() >= 400 - plan.max_open, what="the oldest closed")
            log = cloud.log.read_text()
            assert "open connections per process lowered from 1000 to" in log
            assert "at the open-connection cap" in log
            gauge = scrape(cloud)[("webhook_connect_open_connections", ())]
            assert 0 < gauge <= plan.max_open
    finally:
        for sock in sockets:
            sock.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused_with_503(
    tmp_path: Path,
) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    limits = ("--max-open-connections", "4", "--body-timeout", "2")
    cloud = Cloud(f"sqlite:///{tmp_path / 'buffer.db'}", path, tmp_path, *limits)
    busy: list[socket.socket] = []
    try:
        with running(cloud):
            for _ in range(4):  # heads complete, bodies not: requests in progress
                sock = dial(cloud)
                sock.sendall(HEAD + b"z")
                busy.append(sock)
            answer = httpx.post(f"{cloud.url}/webhook/blob", content=b"refused", timeout=5)
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            assert answer.headers["connection"] == "close"
            assert answer.json() == {"error": "too_many_connections"}
            # When the body deadline frees the slots, webhooks go through again.
            wait_until(
                lambda: httpx.post(f"{cloud.url}/webhook/blob", content=b"ok").status_code == 202,
                timeout=2 + SLACK + 5,
                what="a 202 once the busy slots time out",
            )
            for sock in busy:
                assert until_closed(sock, SLACK).startswith(b"HTTP/1.1 408 ")
            refused = scrape(cloud)[("webhook_connect_connections_refused_total", ())]
            assert refused >= 1
            assert "every one busy (--max-open-connections)" in cloud.log.read_text()
    finally:
        for sock in busy:
            sock.close()


def test_with_several_workers_each_closes_idle_connections(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    args = ("--workers", "2", "--header-timeout", str(DEADLINE))
    with running(Cloud(f"sqlite:///{tmp_path / 'buffer.db'}", path, tmp_path, *args)) as cloud:
        sockets = [dial(cloud) for _ in range(6)]  # spread over both workers by the kernel
        try:
            for sock in sockets:
                assert until_closed(sock, DEADLINE + SLACK) == b""
        finally:
            for sock in sockets:
                sock.close()
        assert httpx.post(f"{cloud.url}/webhook/blob", content=b"x").status_code == 202
        wait_until(lambda: closed_total(cloud, HEADER_TIMEOUT) >= 6, what="summed over workers")
