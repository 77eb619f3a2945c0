"""Consumer group lifecycle through the real cloud, on both storage backends.

A group holds every message it has not acked and ``max_queue_size`` counts them all, so a
connection that once asked for ``?group=typo`` (or one smee-client session, group ``smee``)
used to fill the channel although the real connector acked everything: ingest then answered
503 ``channel_full`` until the messages' TTL. These tests run that scenario with the real
connector and check each way out: the operator drops the group (admin API or CLI), or
housekeeping drops it after ``group_idle_seconds``; and that a channel with
``dynamic_groups: false`` refuses the unknown group in the first place.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.servers import REPO, Cloud, ConnectorProcess, Sink, running, wait_until

ADMIN = "groups-admin-token-0123456789"
TOKENS = {"dev": "dev-channel-token-1", "quick": "quick-channel-token-1", "fixed": "fixed-token-1"}
FULL_AT = 12


def relay(channel: str, **limits: object) -> dict[str, object]:
    settings = {"channel": channel, "channel_token": TOKENS[channel], **limits}
    return {"module": "webhook_connect", "data_type": "blob", "module-config": settings}


WEBHOOKS = {
    "dev": relay("dev", max_queue_size=FULL_AT),
    "quick": relay("quick", max_queue_size=FULL_AT, group_idle_seconds=2),
    "fixed": relay("fixed", dynamic_groups=False),
}


@pytest.fixture
def cloud(storage_url: str, tmp_path: Path) -> Iterator[Cloud]:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    with running(Cloud(storage_url, path, tmp_path, "--admin-token", ADMIN)) as server:
        yield server


@pytest.fixture
def connectors() -> Iterator[list[ConnectorProcess]]:
    started: list[ConnectorProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop(signal.SIGKILL)


def start_connector(
    started: list[ConnectorProcess], cloud: Cloud, sink: Sink, workdir: Path, channel: str
) -> ConnectorProcess:
    """The real connector on ``channel`` (group ``default``), delivering to ``sink``."""
    settings = {
        "protocol": "websocket",
        "cloud_url": cloud.url,
        "channel": channel,
        "token": TOKENS[channel],
        "connector_id": f"real-{channel}",
        "state_dir": str(workdir / f"state-{channel}"),
        "reconnect_delay_seconds": 0.2,
        "max_reconnect_delay_seconds": 1,
        "default_target": {"url": sink.url},
    }
    process = ConnectorProcess(workdir, settings, f"connector-{channel}")
    started.append(process)
    process.start()
    wait_until(lambda: "connected to" in process.output(), 20, "the connector to connect")
    return process


def api(cloud: Cloud, method: str, path: str, body: object = None) -> httpx.Response:
    content = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.request(
        method, f"{cloud.url}/admin{path}", content=content, headers=headers, timeout=10
    )


def cli(cloud: Cloud, *args: str) -> subprocess.CompletedProcess[str]:
    """``webhook-connect ARGS`` as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_CONNECT_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "WEBHOOK_CONNECT_CLOUD_URL": cloud.url,
        "WEBHOOK_CONNECT_ADMIN_TOKEN": ADMIN,
    }
    return subprocess.run(
        [sys.executable, "-m", "webhook_connect", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def post(cloud: Cloud, webhook: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{cloud.url}/webhook/{webhook}", content=body, timeout=10)


def groups(cloud: Cloud, channel: str) -> dict[str, dict[str, Any]]:
    answer = api(cloud, "GET", f"/channels/{channel}/groups")
    assert answer.status_code == 200, answer.text
    return {group["name"]: group for group in answer.json()["groups"]}


def bodies(sink: Sink) -> set[bytes]:
    return {base64.b64decode(str(record["body_b64"])) for record in sink.records()}


async def stray_visit(cloud: Cloud, channel: str, group: str) -> None:
    """A connection asking for ``group`` that goes away at once (a typo, a tried tool)."""
    url = f"{cloud.url.replace('http', 'ws', 1)}/connect/stream/{channel}?group={group}"
    headers = {"Authorization": f"Bearer {TOKENS[channel]}"}
    async with connect(url, additional_headers=headers) as socket:
        hello = json.loads(await asyncio.wait_for(socket.recv(), 10))
        assert (hello["type"], hello["group"]) == ("connected", group)


def in_flight(cloud: Cloud, channel: str) -> int:
    return int(api(cloud, "GET", f"/channels/{channel}").json()["stats"]["in_flight"])


def fill(cloud: Cloud, sink: Sink, webhook: str) -> set[bytes]:
    """``FULL_AT`` webhooks, all delivered to the sink (the connector acks them next)."""
    sent = {f"{webhook}-{i}".encode() for i in range(FULL_AT)}
    for body in sorted(sent):
        answer = post(cloud, webhook, body)
        assert answer.status_code == 202, answer.text
    wait_until(lambda: sent <= bodies(sink), 20, "every message at the sink")
    return sent


def assert_full_because_of(cloud: Cloud, webhook: str, group: str) -> None:
    refused = post(cloud, webhook, b"one too many")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "channel_full"
    assert f"group {group!r}" in refused.json()["detail"], refused.text


@pytest.mark.parametrize("how", ["api", "cli"])
def test_a_stray_group_fills_the_channel_until_the_operator_drops_it(
    cloud: Cloud,
    sink: Sink,
    tmp_path: Path,
    connectors: list[ConnectorProcess],
    how: str,
) -> None:
    start_connector(connectors, cloud, sink, tmp_path, "dev")
    asyncio.run(stray_visit(cloud, "dev", "typo"))
    fill(cloud, sink, "dev")
    wait_until(lambda: in_flight(cloud, "dev") == 0, 10, "every ack")
    # The real connector acked everything; the group nobody reads holds the channel full.
    assert_full_because_of(cloud, "dev", "typo")
    listed = groups(cloud, "dev")
    assert listed["default"]["backlog"] == 0
    assert listed["typo"]["backlog"] == FULL_AT
    assert (listed["typo"]["connections"], listed["default"]["connections"]) == (0, 1)
    assert listed["typo"]["oldest_age_seconds"] >= 0
    assert listed["default"]["expires_at"] is None, "the default group never expires"

    if how == "api":
        dropped = api(cloud, "DELETE", "/channels/dev/groups/typo")
        assert dropped.status_code == 200, dropped.text
        assert dropped.json() == {
            "dropped": "typo",
            "backlog": FULL_AT,
            "disconnected": 0,
            "recreated": False,
        }
    else:
        printed = cli(cloud, "channels", "groups", "dev")
        assert printed.returncode == 0, printed.stderr
        header, *rows = printed.stdout.splitlines()
        assert header.split()[:3] == ["NAME", "BACKLOG", "IN_FLIGHT"]
        assert [row.split()[:2] for row in rows] == [["default", "0"], ["typo", str(FULL_AT)]]
        dropped_cli = cli(cloud, "channels", "drop-group", "dev", "typo", "--yes")
        assert dropped_cli.returncode == 0, dropped_cli.stderr
        assert f"dropped group typo of channel dev: {FULL_AT} message(s)" in dropped_cli.stdout
        again = cli(cloud, "channels", "drop-group", "dev", "typo", "--yes")
        assert again.returncode == 1 and "404 unknown_group" in again.stderr

    assert list(groups(cloud, "dev")) == ["default"]
    accepted = post(cloud, "dev", b"after the drop")
    assert accepted.status_code == 202, accepted.text
    wait_until(lambda: b"after the drop" in bodies(sink), 20, "the new message at the sink")


def test_an_idle_stray_group_is_dropped_by_housekeeping(
    cloud: Cloud, sink: Sink, tmp_path: Path, connectors: list[ConnectorProcess]
) -> None:
    start_connector(connectors, cloud, sink, tmp_path, "quick")

    async def scenario() -> None:
        url = f"{cloud.url.replace('http', 'ws', 1)}/connect/stream/quick?group=smee"
        headers = {"Authorization": f"Bearer {TOKENS['quick']}"}
        # While a connection of the group is open it is in use, not idle: the channel fills.
        async with connect(url, additional_headers=headers) as socket:
            assert json.loads(await socket.recv())["group"] == "smee"
            await asyncio.to_thread(fill, cloud, sink, "quick")
            await asyncio.to_thread(
                wait_until, lambda: groups(cloud, "quick")["default"]["backlog"] == 0, 10
            )
            await asyncio.to_thread(assert_full_because_of, cloud, "quick", "smee")
            assert groups(cloud, "quick")["smee"]["expires_at"] is None, "connected"

    asyncio.run(scenario())
    # Gone for group_idle_seconds (2): the next housekeeping turn (every 5 s) drops it.
    wait_until(lambda: "smee" not in groups(cloud, "quick"), 20, "the idle group to go")
    accepted = post(cloud, "quick", b"after the expiry")
    assert accepted.status_code == 202, accepted.text
    wait_until(lambda: b"after the expiry" in bodies(sink), 20, "the new message at the sink")
    assert "dropped group 'smee' of 'quick'" in cloud.log.read_text()


def test_a_channel_without_dynamic_groups_refuses_unknown_ones(cloud: Cloud) -> None:
    headers = {"Authorization": f"Bearer {TOKENS['fixed']}"}
    base = f"{cloud.url}/connect/stream/fixed"
    for path in ("/sse?group=typo", "/poll?group=typo&timeout=1"):
        refused = httpx.get(base + path, headers=headers, timeout=10)
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"] == "unknown_group"
    smee = httpx.get(f"{cloud.url}/smee/fixed?token={TOKENS['fixed']}", timeout=10)
    assert (smee.status_code, smee.json()["error"]) == (404, "unknown_group")
    # The default group always exists.
    assert httpx.get(base + "/poll?timeout=1", headers=headers, timeout=10).status_code == 204

    async def websocket_close_code(group: str) -> int | None:
        url = f"{base.replace('http', 'ws', 1)}?group={group}"
        async with connect(url, additional_headers=headers) as socket:
            try:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                assert "unknown group 'typo'" in closed.rcvd.reason
                return closed.rcvd.code
            assert frame["type"] == "connected"
            return None

    assert asyncio.run(websocket_close_code("typo")) == 4404
    assert list(groups(cloud, "fixed")) == ["default"], "the refusal created nothing"
    added = cli(cloud, "channels", "add-group", "fixed", "typo")
    assert added.returncode == 0, added.stderr
    assert asyncio.run(websocket_close_code("typo")) is None, "a group the operator added"
    # Groups the operator made are not dropped for being idle on such a channel.
    assert groups(cloud, "fixed")["typo"]["expires_at"] is None
    again = api(cloud, "POST", "/channels/fixed/groups", {"group": "typo"})
    assert (again.status_code, again.json()["error"]) == (409, "group_exists")


def test_group_settings_and_operations_are_validated(cloud: Cloud, tmp_path: Path) -> None:
    for body, field in (
        ({"group_idle_seconds": -1}, "group_idle_seconds"),
        ({"group_idle_seconds": "60"}, "group_idle_seconds"),
        ({"group_idle_seconds": 1.5}, "group_idle_seconds"),
        ({"dynamic_groups": "no"}, "dynamic_groups"),
        ({"dynamic_groups": 0}, "dynamic_groups"),
    ):
        answer = api(cloud, "PATCH", "/channels/dev", body)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["detail"].startswith(f"{field}: "), answer.text
    created = api(
        cloud,
        "POST",
        "/channels",
        {"name": "api-made", "group_idle_seconds": 0, "dynamic_groups": False},
    )
    assert created.status_code == 201, created.text
    channel = created.json()["channel"]
    assert (channel["group_idle_seconds"], channel["dynamic_groups"]) == (0, False)
    updated = cli(
        cloud, "channels", "update", "api-made", "--group-idle-seconds", "600", "--dynamic-groups"
    )
    assert updated.returncode == 0, updated.stderr
    shown = api(cloud, "GET", "/channels/api-made").json()["channel"]
    assert (shown["group_idle_seconds"], shown["dynamic_groups"]) == (600, True)
    negative = cli(cloud, "channels", "update", "api-made", "--group-idle-seconds", "-5")
    assert negative.returncode == 2 and "--group-idle-seconds" in negative.stderr

    assert api(cloud, "DELETE", "/channels/dev/groups/nope").json()["error"] == "unknown_group"
    assert api(cloud, "DELETE", "/channels/dev/groups/bad%20name").status_code == 422
    assert api(cloud, "DELETE", "/channels/nowhere/groups/x").status_code == 404
    bad_name = api(cloud, "POST", "/channels/dev/groups", {"group": "no/slash"})
    assert bad_name.status_code == 422 and bad_name.json()["detail"].startswith("group: ")
    # Dropping the default group empties it; it exists again at once.
    assert post(cloud, "dev", b"waiting").status_code == 202
    dropped = api(cloud, "DELETE", "/channels/dev/groups/default")
    assert dropped.json() == {
        "dropped": "default",
        "backlog": 1,
        "disconnected": 0,
        "recreated": True,
    }
    assert groups(cloud, "dev")["default"]["backlog"] == 0


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"group_idle_seconds": -1}, "group_idle_seconds: Input should be greater than or equal"),
        ({"group_idle_seconds": "1h"}, "group_idle_seconds: Input should be a valid integer"),
        ({"dynamic_groups": "false"}, "dynamic_groups: Input should be a valid boolean"),
    ],
)
def test_bad_group_settings_in_webhooks_json_stop_start_up(
    tmp_path: Path, settings: dict[str, object], reason: str
) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps({"dev": relay("dev", **settings)}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "webhook_connect",
            "cloud",
            "--webhooks",
            str(path),
            "--storage",
            f"sqlite:///{tmp_path / 'b.db'}",
            "--port",
            "1",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"{path}: dev.module-config.{reason}" in line, line
