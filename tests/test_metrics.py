"""``GET /metrics`` and the JSON log lines, against the real cloud (docs/OPERATIONS.md)."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
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
        "level": "debug", "webhook_id": "guarded", "channel": "dev", "status": 202,
        "client": "127.0.0.1",
    }  # fmt: skip
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
