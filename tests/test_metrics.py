"""``GET /metrics`` and the JSON log lines, against the real cloud (docs/OPERATIONS.md)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import os
import platform
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.servers import REPO, Cloud, running, wait_until
from webhook_connect.cloud.logs import resolve_format
from webhook_connect.cloud.metrics import SentTimes

TOKEN = "test-token-0123456789"
SECRET = "x-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RELAY = {"channel": "dev", "channel_token": TOKEN}
WEBHOOKS = {
    "open": {"module": "webhook_connect", "module-config": RELAY},
    "guarded": {
        "module": "webhook_connect",
        "authorization": f"Bearer {SECRET}",
        # The refusals below are counted, not locked out (one source sends them all).
        "failed_auth_limit": None,
        "module-config": RELAY,
    },
    "ops": {
        "module": "webhook_connect",
        "module-config": {"channel": "ops", "channel_token": "t" + TOKEN},
    },
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(cloud: Cloud) -> Samples:
    """Every sample of ``/metrics``, parsed by prometheus_client's own parser."""
    answer = httpx.get(f"{cloud.url}/metrics", headers={"Connection": "close"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def post(cloud: Cloud, webhook: str, body: bytes = b'{"n": 1}', **headers: str) -> httpx.Response:
    return httpx.post(
        f"{cloud.url}/webhook/{webhook}",
        content=body,
        headers={"Content-Type": "application/json", "Connection": "close", **headers},
    )


def take_and_ack(cloud: Cloud) -> str:
    """A long-poll connector takes one message of ``dev`` and acks it; its id."""
    poll = httpx.get(
        f"{cloud.url}/connect/stream/dev/poll",
        params={"timeout": 5, "max_messages": 1},
        headers=AUTH,
    )
    assert poll.status_code == 200
    [message] = poll.json()["messages"]
    ack = httpx.post(
        f"{cloud.url}/connect/ack",
        json={"message_id": message["message_id"], "status": "ack"},
        headers={**AUTH, "X-Connection-ID": poll.json()["connection_id"]},
    )
    assert ack.json() == {"status": "acknowledged"}
    return str(message["message_id"])


def test_metrics_match_what_was_sent_and_delivered(cloud: Cloud) -> None:
    for _ in range(3):
        assert post(cloud, "open").status_code == 202
    for _ in range(2):
        assert post(cloud, "guarded", Authorization="Bearer wrong").status_code == 401
    assert post(cloud, "open", b"{not json").status_code == 400
    assert post(cloud, "ops").status_code == 202
    assert post(cloud, "nobody").status_code == 404
    take_and_ack(cloud)

    samples = scrape(cloud)
    dev = {"channel": "dev"}
    assert value(samples, "webhook_connect_received_total", **dev) == 6
    assert value(samples, "webhook_connect_received_total", channel="ops") == 1
    rejected = {
        dict(labels)["reason"]: count
        for (name, labels), count in samples.items()
        if name == "webhook_connect_rejected_total" and dict(labels)["channel"] == "dev"
    }
    assert rejected == {"unauthorized": 2, "invalid_json": 1}
    assert value(samples, "webhook_connect_accepted_total", **dev) == 3
    assert value(samples, "webhook_connect_accepted_total", channel="ops") == 1
    assert value(samples, "webhook_connect_delivered_total", **dev) == 1
    assert value(samples, "webhook_connect_dead_lettered_total", **dev) == 0
    assert value(samples, "webhook_connect_queue_depth", **dev) == 2
    assert value(samples, "webhook_connect_in_flight", **dev) == 0
    assert value(samples, "webhook_connect_oldest_message_age_seconds", **dev) > 0
    assert value(samples, "webhook_connect_connectors", channel="dev", transport="long_poll") == 1
    assert value(samples, "webhook_connect_connectors", channel="ops", transport="long_poll") == 0
    assert value(samples, "webhook_connect_ack_latency_seconds_count", **dev) == 1
    assert 0 < value(samples, "webhook_connect_ack_latency_seconds_sum", **dev) < 5
    assert value(samples, "webhook_connect_storage_up") == 1
    # Every answer timed, by channel and status class; a made-up id is counted, never named.
    timed = "webhook_connect_ingest_duration_seconds_count"
    assert value(samples, timed, channel="dev", status_class="2xx") == 3
    assert value(samples, timed, channel="dev", status_class="4xx") == 3
    assert value(samples, timed, channel="ops", status_class="2xx") == 1
    assert (
        value(samples, "webhook_connect_rejected_total", channel="", reason="unknown_webhook") == 1
    )
    assert not any("nobody" in str(labels) for _, labels in samples)
    fast = value(
        samples,
        "webhook_connect_ingest_duration_seconds_bucket",
        channel="dev",
        status_class="2xx",
        le="30.0",
    )
    assert fast == 3
    # The Grafana dashboard only asks for series the cloud exports.
    dashboard = (REPO / "deploy" / "grafana-dashboard.json").read_text()
    exported = {name for name, _ in samples}
    assert set(re.findall(r"webhook_connect_[a-z_]+", dashboard)) <= exported


async def test_websocket_acks_are_timed(cloud: Cloud) -> None:
    url = cloud.url.replace("http://", "ws://") + f"/connect/stream/dev?token={TOKEN}"
    async with connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "connected"
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{cloud.url}/webhook/open", content=b"{}")
        message_id = answer.json()["message_id"]
        while (frame := json.loads(await ws.recv()))["type"] != "webhook":
            pass
        assert frame["message_id"] == message_id
        await ws.send(json.dumps({"type": "ack", "message_id": message_id}))

        def timed() -> bool:
            samples = scrape(cloud)
            return value(samples, "webhook_connect_ack_latency_seconds_count", channel="dev") == 1

        await asyncio.to_thread(wait_until, timed, 10, "the ack to be timed")
        samples = scrape(cloud)
    assert value(samples, "webhook_connect_delivered_total", channel="dev") == 1
    assert value(samples, "webhook_connect_connectors", channel="dev", transport="websocket") == 1


def test_process_counts_are_exact_with_several_workers(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    accepted, refused = 120, 60
    calls = ["open"] * accepted + ["guarded"] * refused
    with running(Cloud(redis_url, path, tmp_path, "--workers", "2")) as cloud:
        # One connection per request: the kernel hands them to either worker.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda webhook: post(cloud, webhook).status_code, calls))
        assert statuses.count(202) == accepted and statuses.count(401) == refused
        # Whichever worker answers a scrape, it sums every worker's counts.
        for samples in [scrape(cloud) for _ in range(6)]:
            dev = {"channel": "dev"}
            assert value(samples, "webhook_connect_received_total", **dev) == accepted + refused
            assert (
                value(samples, "webhook_connect_rejected_total", reason="unauthorized", **dev)
                == refused
            )
            assert value(samples, "webhook_connect_accepted_total", **dev) == accepted
            timed = "webhook_connect_ingest_duration_seconds_count"
            assert value(samples, timed, status_class="2xx", **dev) == accepted
            assert value(samples, timed, status_class="4xx", **dev) == refused
        # Process figures describe the whole server, whichever worker answers: its start
        # time, and the memory of the supervisor and every worker together.
        assert cloud.process is not None
        root = cloud.process.pid
        tree = [root, *children(root)]
        assert len(tree) >= 3, "a supervisor and two workers"
        for samples in [scrape(cloud) for _ in range(4)]:
            assert value(samples, "process_start_time_seconds") == pytest.approx(
                start_time(root), abs=0.02
            )
            resident = sum(rss_bytes(pid) for pid in tree)
            assert (
                0.8 * resident < value(samples, "process_resident_memory_bytes") < 1.25 * resident
            )
            assert value(samples, "process_open_fds") > len(tree) * 3
            assert value(samples, "process_cpu_seconds_total") > 0


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, found by scanning /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def start_time(pid: int) -> float:
    """When ``pid`` started, in Unix seconds, from /proc (the kernel's clock ticks)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_build_info_and_process_figures_of_a_single_process(cloud: Cloud) -> None:
    samples = scrape(cloud)
    version = importlib.metadata.version("webhook-connect")
    python = platform.python_version()
    assert value(samples, "webhook_connect_build_info", version=version, python=python) == 1
    assert [n for n, _ in samples if n == "webhook_connect_build_info"] == [
        "webhook_connect_build_info"
    ]
    assert cloud.process is not None
    assert value(samples, "process_start_time_seconds") == pytest.approx(
        start_time(cloud.process.pid), abs=0.02
    )
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds"):
        assert value(samples, name) > 0, name
    python_info = [labels for name, labels in samples if name == "python_info"]
    assert python_info and ("version", python) in python_info[0]


def test_json_logs_name_each_request_and_mask_secrets(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    storage = f"sqlite:///{tmp_path / 'buffer.db'}"
    extra = ("--log-format", "json", "--log-level", "debug")
    with running(Cloud(storage, path, tmp_path, *extra)) as cloud:
        accepted = post(cloud, "guarded", Authorization=f"Bearer {SECRET}")
        assert accepted.status_code == 202
        assert post(cloud, "guarded", Authorization="Bearer not-the-token").status_code == 401
        acked = take_and_ack(cloud)

        def events() -> list[dict[str, object]]:
            lines = cloud.log.read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]

        wait_until(lambda: any(e.get("event") == "ack" for e in events()), what="the ack line")
    records = events()  # every line parses as JSON, start-up and shutdown included
    log = cloud.log.read_text()
    assert SECRET not in log and "not-the-token" not in log
    ingest = [e for e in records if e.get("event") == "ingest"]
    assert len(ingest) == 2
    ok, refused = ingest
    assert ok["message_id"] == accepted.json()["message_id"]
    assert {k: ok[k] for k in ("level", "webhook_id", "channel", "status", "client")} == {
        "level": "debug",
        "webhook_id": "guarded",
        "channel": "dev",
        "status": 202,
        "client": "127.0.0.1",
    }
    assert isinstance(ok["duration_ms"], float) and isinstance(ok["time"], str)
    assert refused["status"] == 401 and refused["error"] == "unauthorized"
    assert "message_id" not in refused
    [ack] = [e for e in records if e.get("event") == "ack"]
    assert ack["message_id"] == acked and ack["channel"] == "dev" and ack["group"] == "default"
    assert isinstance(ack["connection"], str) and len(ack["connection"]) == 32


def test_auto_log_format_is_text_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Terminal()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("text", io.StringIO()) == "text"


def test_sent_times_give_ack_latency_and_stay_bounded() -> None:
    sent = SentTimes(limit=3)
    sent.sent("c1", ["a", "b"], now=10.0)
    sent.sent("c2", ["a"], now=11.0)
    assert sent.settled("c1", ["a", "zz"], now=10.5) == [0.5], "unknown ids are skipped"
    assert sent.settled("c1", ["a"], now=12.0) == [], "settled once"
    sent.sent("c1", ["b"], now=20.0)  # redelivered: timed from the new send
    sent.sent("c3", ["x", "y"], now=21.0)  # over the limit: the oldest (c2/a) goes
    assert sent.settled("c2", ["a"], now=22.0) == []
    got: Iterable[float] = sent.settled("c1", ["b"], now=22.0) + sent.settled("c3", ["y"], 22.0)
    assert list(got) == [2.0, 1.0]
