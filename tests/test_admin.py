"""The admin API (docs/ADMIN.md) through the real cloud, on both storage backends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.servers import REPO, Cloud, ConnectorProcess, Sink, running, wait_until

ADMIN = "admin-token-0123456789"
TOKEN = "config-channel-token"
WEBHOOKS = {
    "hook": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {"channel": "dev", "channel_token": TOKEN, "history_seconds": 3600},
    }
}


def start(storage: str, workdir: Path) -> Cloud:
    path = workdir / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    return Cloud(storage, path, workdir, "--admin-token", ADMIN)


@pytest.fixture
def admin_cloud(storage_url: str, tmp_path: Path) -> Iterator[Cloud]:
    with running(start(storage_url, tmp_path)) as server:
        yield server


def api(
    cloud: Cloud, method: str, path: str, body: object = None, token: str = ADMIN
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    content = None if body is None else json.dumps(body).encode()
    return httpx.request(
        method, f"{cloud.url}/admin{path}", content=content, headers=headers, timeout=10
    )


def poll(cloud: Cloud, channel: str, token: str, timeout: int = 1) -> httpx.Response:
    return httpx.get(
        f"{cloud.url}/connect/stream/{channel}/poll",
        params={"timeout": timeout},
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout + 10,
    )


def post_webhook(cloud: Cloud, body: bytes = b"payload") -> str:
    answer = httpx.post(f"{cloud.url}/webhook/hook", content=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["message_id"])


def test_the_admin_api_refuses_a_missing_wrong_or_connector_token(admin_cloud: Cloud) -> None:
    for token in ("", "wrong-admin-token-000", TOKEN):
        answer = api(admin_cloud, "GET", "/channels", token=token)
        assert answer.status_code == 401
        assert answer.json()["error"] == "unauthorized"
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert api(admin_cloud, "GET", "/channels").status_code == 200


def test_channel_lifecycle(admin_cloud: Cloud) -> None:
    created = api(admin_cloud, "POST", "/channels", {"name": "orders", "max_queue_size": 50})
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    assert created.json()["channel"]["max_queue_size"] == 50
    assert poll(admin_cloud, "orders", token).status_code in (200, 204)
    assert poll(admin_cloud, "dev", token).status_code == 401  # one token, one channel

    duplicate = api(admin_cloud, "POST", "/channels", {"name": "orders"})
    assert (duplicate.status_code, duplicate.json()["error"]) == (409, "channel_exists")
    names = [c["name"] for c in api(admin_cloud, "GET", "/channels").json()["channels"]]
    assert names == ["dev", "orders"]

    updated = api(admin_cloud, "PATCH", "/channels/orders", {"ttl_seconds": 60})
    assert updated.json()["channel"]["ttl_seconds"] == 60
    assert updated.json()["channel"]["max_queue_size"] == 50
    bad = api(admin_cloud, "PATCH", "/channels/orders", {"max_in_flight": 0})
    assert (bad.status_code, bad.json()["error"]) == (422, "invalid")
    assert bad.json()["detail"].startswith("max_in_flight:")
    unknown_field = api(admin_cloud, "PATCH", "/channels/orders", {"colour": "red"})
    assert unknown_field.json()["detail"] == "colour: unknown field"

    deleted = api(admin_cloud, "DELETE", "/channels/orders")
    assert deleted.json()["deleted"] == "orders"
    assert api(admin_cloud, "GET", "/channels/orders").status_code == 404
    assert poll(admin_cloud, "orders", token).status_code == 401


@pytest.mark.parametrize("name", ["a/b", "a*", "{dev}", "a b", "x" * 300, "", "-lead"])
def test_channel_names_with_metacharacters_are_refused(admin_cloud: Cloud, name: str) -> None:
    answer = api(admin_cloud, "POST", "/channels", {"name": name})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith("name:")


def test_unknown_things_are_404(admin_cloud: Cloud) -> None:
    for method, path in [
        ("GET", "/channels/nope"),
        ("PATCH", "/channels/nope"),
        ("DELETE", "/channels/nope"),
        ("GET", "/channels/nope/dead-letters"),
        ("DELETE", "/channels/dev/tokens/nope"),
        ("DELETE", "/channels/dev/connections/nope"),
        ("GET", "/channels/dev/dead-letters/1-1"),
    ]:
        answer = api(admin_cloud, method, path, {} if method == "PATCH" else None)
        assert answer.status_code == 404, (method, path, answer.text)
    assert api(admin_cloud, "GET", "/channels/a*b").status_code == 422


def test_stats_match_what_was_sent(admin_cloud: Cloud) -> None:
    for n in range(5):
        post_webhook(admin_cloud, f"m{n}".encode())
    taken = poll(admin_cloud, "dev", TOKEN).json()
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Connection-ID": taken["connection_id"]}
    for message in taken["messages"][:2]:
        ack = {"message_id": message["message_id"], "status": "ack"}
        assert httpx.post(f"{admin_cloud.url}/connect/ack", json=ack, headers=headers).is_success
    shown = api(admin_cloud, "GET", "/channels/dev").json()
    assert shown["stats"]["counters"]["accepted"] == 5
    assert shown["stats"]["counters"]["delivered"] == 2
    assert shown["stats"]["depth"] == 3
    assert shown["stats"]["in_flight"] == 3
    [connection] = shown["connections"]
    assert connection["connection_id"] == taken["connection_id"]
    assert connection["transport"] == "long_poll"
    assert connection["in_flight"] == 3
    assert connection["delivered"] == 2
    assert [t["label"] for t in shown["tokens"]] == ["webhooks.json:hook"]
    events = api(admin_cloud, "GET", "/channels/dev/events?limit=10").json()["events"]
    assert [e["type"] for e in events] == ["delivered"] * 2 + ["received"] * 5
    assert events[0]["consumer"] == taken["connection_id"]
    assert api(admin_cloud, "GET", "/channels/dev/events?limit=0").status_code == 422


def test_tokens_are_issued_listed_and_expire(admin_cloud: Cloud) -> None:
    issued = api(admin_cloud, "POST", "/channels/dev/tokens", {"label": "laptop"})
    assert issued.status_code == 201
    assert poll(admin_cloud, "dev", issued.json()["token"]).status_code in (200, 204)
    short = api(admin_cloud, "POST", "/channels/dev/tokens", {"expires_in_seconds": 1}).json()
    assert poll(admin_cloud, "dev", short["token"]).status_code in (200, 204)
    wait_until(lambda: poll(admin_cloud, "dev", short["token"]).status_code == 401, 10, "expiry")
    listed = api(admin_cloud, "GET", "/channels/dev/tokens").json()["tokens"]
    assert {t["label"] for t in listed} == {"webhooks.json:hook", "laptop", ""}
    assert all("token" not in t and "token_hash" not in t for t in listed)


def test_rotation_keeps_the_old_token_for_the_grace_period(admin_cloud: Cloud) -> None:
    rotated = api(admin_cloud, "POST", "/channels/dev/rotate-token", {"grace_seconds": 2})
    assert rotated.status_code == 201
    new = rotated.json()["token"]
    began = time.time()
    assert poll(admin_cloud, "dev", TOKEN).status_code in (200, 204)  # within the grace
    assert poll(admin_cloud, "dev", new).status_code in (200, 204)
    wait_until(lambda: poll(admin_cloud, "dev", TOKEN).status_code == 401, 10, "grace end")
    assert time.time() - began >= 1.5  # not before the grace ended
    assert poll(admin_cloud, "dev", new).status_code in (200, 204)


def test_a_revoked_tokens_live_connections_close_and_cannot_reconnect(
    admin_cloud: Cloud,
) -> None:
    token = api(admin_cloud, "POST", "/channels/dev/tokens", {"label": "ws"}).json()
    url = admin_cloud.url.replace("http://", "ws://") + "/connect/stream/dev"
    headers = {"Authorization": f"Bearer {token['token']}"}

    async def session() -> int | None:
        async with websockets.connect(url, additional_headers=headers) as socket:
            hello = json.loads(await socket.recv())
            assert hello["type"] == "connected"
            listed = api(admin_cloud, "GET", "/channels/dev/connections").json()
            assert [c["token_id"] for c in listed["connections"]] == [token["token_id"]]
            revoked = await asyncio.to_thread(
                api, admin_cloud, "DELETE", f"/channels/dev/tokens/{token['token_id']}"
            )
            assert revoked.json() == {"revoked": token["token_id"], "disconnected": 1}
            began = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(socket.recv(), 15)
            assert time.monotonic() - began < 12
            return closed.value.rcvd.code if closed.value.rcvd else None

    code = asyncio.run(session())
    assert code in (4001, 4002)
    assert poll(admin_cloud, "dev", token["token"]).status_code == 401


def test_a_revoked_tokens_sse_stream_ends_and_cannot_reopen(admin_cloud: Cloud) -> None:
    token = api(admin_cloud, "POST", "/channels/dev/tokens", {"label": "sse"}).json()
    url = f"{admin_cloud.url}/connect/stream/dev/sse"
    headers = {"Authorization": f"Bearer {token['token']}"}
    with httpx.stream("GET", url, headers=headers, timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: connected"
        revoked = api(admin_cloud, "DELETE", f"/channels/dev/tokens/{token['token_id']}")
        assert revoked.json()["disconnected"] == 1
        began = time.monotonic()
        for _ in lines:  # heartbeats until the cloud ends the stream
            assert time.monotonic() - began < 15, "the stream outlived its token"
    assert time.monotonic() - began < 15
    reopened = httpx.get(url, headers=headers, timeout=10)
    assert reopened.status_code == 401


def test_an_operator_disconnects_a_connection(admin_cloud: Cloud) -> None:
    post_webhook(admin_cloud)
    taken = poll(admin_cloud, "dev", TOKEN).json()
    connection_id = taken["connection_id"]
    answer = api(admin_cloud, "DELETE", f"/channels/dev/connections/{connection_id}")
    assert answer.json() == {"disconnected": connection_id}
    assert api(admin_cloud, "GET", "/channels/dev/connections").json()["connections"] == []
    # What it held went back to the channel at once.
    again = poll(admin_cloud, "dev", TOKEN).json()
    assert [m["message_id"] for m in again["messages"]] == [taken["messages"][0]["message_id"]]


def dead_letter(cloud: Cloud, body: bytes) -> str:
    message_id = post_webhook(cloud, body)
    taken = poll(cloud, "dev", TOKEN).json()
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Connection-ID": taken["connection_id"]}
    nack = {"message_id": message_id, "status": "nack", "retry": False, "reason": "HTTP 400"}
    assert httpx.post(f"{cloud.url}/connect/ack", json=nack, headers=headers).is_success
    return message_id


def test_dead_letters_are_listed_shown_replayed_and_purged(admin_cloud: Cloud) -> None:
    first = dead_letter(admin_cloud, b"\x00first\xff")
    second = dead_letter(admin_cloud, b"second")
    listed = api(admin_cloud, "GET", "/channels/dev/dead-letters").json()["dead_letters"]
    assert [d["message_id"] for d in listed] == [first, second]
    assert listed[0]["attempts"] == 1 and listed[0]["webhook_id"] == "hook"
    shown: dict[str, Any] = api(admin_cloud, "GET", f"/channels/dev/dead-letters/{first}").json()
    assert shown["body_base64"] == "AGZpcnN0/w=="
    assert shown["size"] == 7

    replayed = api(admin_cloud, "POST", "/channels/dev/dead-letters/replay", {"ids": [first]})
    assert replayed.json() == {"replayed": 1}
    again = poll(admin_cloud, "dev", TOKEN).json()["messages"]
    assert len(again) == 1 and again[0]["message_id"] != first  # a new id, same body
    missing = api(admin_cloud, "POST", "/channels/dev/dead-letters/replay", {"ids": ["9-9"]})
    assert missing.status_code == 404

    purged = api(admin_cloud, "DELETE", "/channels/dev/dead-letters", {"all": True})
    assert purged.json() == {"purged": 1}
    assert api(admin_cloud, "GET", "/channels/dev/dead-letters").json()["dead_letters"] == []


def test_a_dead_letter_shows_each_delivery_attempt(admin_cloud: Cloud, tmp_path: Path) -> None:
    """A real connector against a target that answers 503: each attempt is on record."""
    limits = {"max_delivery_attempts": 2, "retry_delay_seconds": 0.1}
    assert api(admin_cloud, "PATCH", "/channels/dev", limits).status_code == 200
    failing = Sink(tmp_path, status=503)
    connector = ConnectorProcess(
        tmp_path,
        {
            "protocol": "websocket",
            "cloud_url": admin_cloud.url,
            "channel": "dev",
            "token": TOKEN,
            "connector_id": "on-prem-7",
            "state_dir": str(tmp_path / "state"),
            "default_target": {"url": failing.url, "retry_max_attempts": 1},
        },
    )
    with running(failing), contextlib.ExitStack() as stack:
        connector.start()
        stack.callback(connector.stop, signal.SIGKILL)
        message_id = post_webhook(admin_cloud)
        path = f"/channels/dev/dead-letters/{message_id}"
        wait_until(lambda: api(admin_cloud, "GET", path).status_code == 200, 30, "dead letter")
    shown = api(admin_cloud, "GET", path).json()
    assert (shown["reason"], shown["attempts"]) == ("max_delivery_attempts", 2)
    attempts = shown["delivery_attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert {(a["connector_id"], a["outcome"], a["status_code"]) for a in attempts} == {
        ("on-prem-7", "http_503", 503)
    }
    assert all(0 <= a["duration_seconds"] < 10 for a in attempts)
    assert shown["dead_at"] - 10 < attempts[0]["time"] <= attempts[1]["time"] <= shown["dead_at"]
    assert len(failing.records()) == 2
    listed = api(admin_cloud, "GET", "/channels/dev/dead-letters").json()["dead_letters"]
    assert listed[0]["delivery_attempts"] == attempts


def test_a_channel_created_on_one_replica_is_served_by_another(
    redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running(start(redis_url, tmp_path / "a")) as one,
        running(start(redis_url, tmp_path / "b")) as two,
    ):
        token = api(one, "POST", "/channels", {"name": "shared"}).json()["token"]
        assert api(two, "GET", "/channels/shared").status_code == 200
        assert poll(two, "shared", token).status_code in (200, 204)
        api(two, "DELETE", "/channels/shared")
        assert api(one, "GET", "/channels/shared").status_code == 404


def test_an_api_channel_survives_a_restart(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    with running(start(storage, tmp_path)) as cloud:
        token = api(cloud, "POST", "/channels", {"name": "kept", "ttl_seconds": 99}).json()
    with running(start(storage, tmp_path)) as cloud:
        assert api(cloud, "GET", "/channels/kept").json()["channel"]["ttl_seconds"] == 99
        assert poll(cloud, "kept", token["token"]).status_code in (200, 204)


def ack_all(cloud: Cloud) -> list[str]:
    taken = poll(cloud, "dev", TOKEN).json()
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Connection-ID": taken["connection_id"]}
    ids = [m["message_id"] for m in taken["messages"]]
    acks = {"message_ids": ids, "status": "ack"}
    assert httpx.post(f"{cloud.url}/connect/ack", json=acks, headers=headers).is_success
    return ids


def test_history_is_replayed_from_a_point_in_time(admin_cloud: Cloud) -> None:
    post_webhook(admin_cloud, b"before")
    time.sleep(0.05)
    since = time.time()
    sent = [post_webhook(admin_cloud, f"after-{n}".encode()) for n in range(3)]
    assert len(ack_all(admin_cloud)) == 4
    assert api(admin_cloud, "GET", "/channels/dev").json()["stats"]["depth"] == 0

    replayed = api(admin_cloud, "POST", "/channels/dev/replay", {"since": since})
    assert replayed.json() == {"replayed": 3, "group": "default"}
    again = poll(admin_cloud, "dev", TOKEN).json()["messages"]
    assert [m["payload"] for m in again] == ["after-0", "after-1", "after-2"]
    assert not set(sent) & {m["message_id"] for m in again}  # new ids

    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since - 60))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "webhook_connect",
            "channels",
            "replay",
            "dev",
            "--since",
            iso,
            "--group",
            "audit",
            "--cloud-url",
            admin_cloud.url,
            "--admin-token",
            ADMIN,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert cli.returncode == 0, cli.stderr
    assert "replayed 4 message(s) to group audit" in cli.stdout

    api(admin_cloud, "POST", "/channels", {"name": "plain"})
    refused = api(admin_cloud, "POST", "/channels/plain/replay", {"since": 0})
    assert (refused.status_code, refused.json()["error"]) == (409, "no_history")
    bad = api(admin_cloud, "POST", "/channels/dev/replay", {"since": "yesterday"})
    assert bad.status_code == 422
