"""``webhook-connect channels|dlq``: the real command against a real cloud, as a subprocess.

One cloud (SQLite) serves the whole module; each test works on channels of its own, except the
dead-letter test, which owns ``dev`` (from ``webhooks.json``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.servers import REPO, Cloud, free_port, running
from webhook_connect.shared.admintext import body_lines, format_value, iso_utc, key_values, table

ADMIN_TOKEN = "admin-cli-admin-token-0123"
DEV_TOKEN = "admin-cli-dev-token-0123"
WEBHOOKS = {
    "dev": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {
            "channel": "dev",
            "channel_token": DEV_TOKEN,
            "max_delivery_attempts": 1,
            "retry_delay_seconds": 0,
        },
    },
}
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """One cloud with the admin API on, for the whole module (overrides conftest's ``cloud``,
    which starts one per test and per backend: the CLI does not depend on the backend)."""
    workdir = tmp_path_factory.mktemp("admin-cli")
    webhooks = workdir / "webhooks.json"
    webhooks.write_text(json.dumps(WEBHOOKS))
    storage = f"sqlite:///{workdir / 'b.db'}"
    with running(Cloud(storage, webhooks, workdir, "--admin-token", ADMIN_TOKEN)) as server:
        yield server


def run_cli(
    cloud_url: str, *args: str, admin_token: str | None = ADMIN_TOKEN, answer: str = ""
) -> subprocess.CompletedProcess[str]:
    """``webhook-connect ARGS`` as a user would run it; ``answer`` is typed at any prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_CONNECT_")}
    env |= {"PYTHONPATH": str(REPO), "WEBHOOK_CONNECT_CLOUD_URL": cloud_url}
    if admin_token is not None:
        env["WEBHOOK_CONNECT_ADMIN_TOKEN"] = admin_token
    return subprocess.run(
        [sys.executable, "-m", "webhook_connect", *args],
        env=env,
        input=answer,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(cloud: Cloud, *args: str) -> str:
    """The output of a command that must succeed."""
    result = run_cli(cloud.url, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def printed_token(output: str) -> str:
    match = re.search(r"^token\s+(\S+)$", output, re.MULTILINE)
    assert match is not None, output
    return match.group(1)


def poll(
    cloud: Cloud, channel: str, token: str, connection_id: str | None = None, timeout: int = 1
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if connection_id is not None:
        headers["X-Connection-ID"] = connection_id
    url = f"{cloud.url}/connect/stream/{channel}/poll"
    return httpx.get(url, params={"timeout": timeout}, headers=headers, timeout=30)


def opens(cloud: Cloud, channel: str, token: str) -> bool:
    """Whether ``token`` opens ``channel``: an SSE stream starts (200) rather than a 401.

    SSE rather than a long-poll, which would hold an accepted token for its whole timeout.
    """
    url = f"{cloud.url}/connect/stream/{channel}/sse"
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream("GET", url, headers=headers, timeout=30) as answer:
        assert answer.status_code in (200, 401), answer.status_code
        return answer.status_code == 200


# Pure rendering -----------------------------------------------------------------------------


def test_rendering_of_times_sizes_tables_and_bodies() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00Z"
    assert iso_utc(1700000000.25) == "2023-11-14T22:13:20.250Z"
    assert format_value("expires_at", None) == "never"
    assert format_value("seen_at", None) == "-"
    assert format_value("label", "") == "-"
    assert format_value("size", 1024) == "1024 B"
    assert format_value("rotated", ["a", "b"]) == "a, b"
    assert table(["name", "depth"], [{"name": "orders", "depth": 12}, {"name": "b"}]) == [
        "NAME    DEPTH",
        "orders  12",
        "b       -",
    ]
    assert key_values({"name": "orders", "ttl_seconds": 60}) == [
        "name         orders",
        "ttl_seconds  60",
    ]
    assert body_lines("héllo\nworld".encode()) == ["body: 12 bytes, UTF-8 text:", "héllo", "world"]
    assert body_lines(b"\xff\x00") == ["body: 2 bytes, not UTF-8, base64:", "/wA="]
    assert body_lines(b"") == ["body: empty (0 bytes)"]


# channels -----------------------------------------------------------------------------------


def test_create_list_show_update(cloud: Cloud) -> None:
    """create prints a token that opens the channel; list, show and update see the limits."""
    output = ok(cloud, "channels", "create", "orders", "--max-queue-size", "50", "--label", "ci")
    assert "created channel orders" in output
    assert "shown only this once" in output
    token = printed_token(output)
    assert opens(cloud, "orders", token)

    listed = ok(cloud, "channels", "list")
    assert re.search(r"^NAME\s+DEPTH", listed, re.MULTILINE)
    assert re.search(r"^orders\s+0\s", listed, re.MULTILINE)

    shown = ok(cloud, "channels", "show", "orders")
    assert re.search(r"^max_queue_size\s+50$", shown, re.MULTILINE)
    token_row = rf"^  \S+\s+ci\s+{ISO_TIME.pattern}\s+never$"
    assert re.search(token_row, shown.split("tokens:")[1], re.MULTILINE), shown
    assert "counters:" in shown and "connections:" in shown

    updated = ok(cloud, "channels", "update", "orders", "--max-in-flight", "7")
    assert re.search(r"^max_in_flight\s+7$", updated, re.MULTILINE)
    answer = json.loads(ok(cloud, "channels", "show", "orders", "--json"))
    assert answer["channel"]["max_in_flight"] == 7
    assert answer["channel"]["max_queue_size"] == 50

    nothing = run_cli(cloud.url, "channels", "update", "orders")
    assert nothing.returncode == 2
    assert "nothing to update" in nothing.stderr
    again = run_cli(cloud.url, "channels", "create", "orders")
    assert again.returncode == 1
    assert again.stderr.startswith("webhook-connect channels: 409 channel_exists")


def test_rotate_without_grace_ends_the_old_token(cloud: Cloud) -> None:
    """rotate prints a new token; with no grace the old one stops opening the channel."""
    old = printed_token(ok(cloud, "channels", "create", "rotating"))
    assert opens(cloud, "rotating", old)
    output = ok(cloud, "channels", "rotate", "rotating", "--grace-seconds", "0", "--label", "v2")
    assert "rotated the tokens of channel rotating" in output
    new = printed_token(output)
    assert new != old
    assert not opens(cloud, "rotating", old)
    assert opens(cloud, "rotating", new)


def test_issue_list_and_revoke_tokens(cloud: Cloud) -> None:
    """issue adds a working token, tokens lists it by id and label, revoke ends it."""
    ok(cloud, "channels", "create", "tokened")
    issued = json.loads(ok(cloud, "channels", "issue", "tokened", "--label", "laptop", "--json"))
    assert opens(cloud, "tokened", issued["token"])
    listed = ok(cloud, "channels", "tokens", "tokened")
    assert re.search(rf"^{issued['token_id']}\s+laptop\s", listed, re.MULTILINE), listed

    output = ok(cloud, "channels", "revoke", "tokened", issued["token_id"])
    assert f"revoked token {issued['token_id']}" in output
    assert not opens(cloud, "tokened", issued["token"])
    again = run_cli(cloud.url, "channels", "revoke", "tokened", issued["token_id"])
    assert again.returncode == 1
    assert again.stderr.startswith("webhook-connect channels: 404 unknown_token")


def test_connections_and_disconnect(cloud: Cloud) -> None:
    """A long-poll connection shows up in connections and show; disconnect forgets it."""
    token = printed_token(ok(cloud, "channels", "create", "wired"))
    first = poll(cloud, "wired", token)
    assert first.status_code == 204
    connection_id = first.headers["x-connection-id"]
    listed = ok(cloud, "channels", "connections", "wired")
    assert re.search(rf"^{connection_id}\s.*\slong_poll\s", listed, re.MULTILINE), listed
    assert connection_id in ok(cloud, "channels", "show", "wired").split("connections:")[1]

    assert f"disconnected {connection_id}" in ok(
        cloud, "channels", "disconnect", "wired", connection_id
    )
    assert poll(cloud, "wired", token, connection_id).status_code == 404
    assert "no connections" in ok(cloud, "channels", "connections", "wired")


def test_delete_asks_first_unless_yes(cloud: Cloud) -> None:
    """delete asks (on stderr), a "no" keeps the channel; --yes deletes it and its tokens."""
    token = printed_token(ok(cloud, "channels", "create", "doomed"))
    refused = run_cli(cloud.url, "channels", "delete", "doomed", answer="n\n")
    assert refused.returncode == 1
    assert "Delete channel doomed" in refused.stderr
    assert opens(cloud, "doomed", token)

    answer = json.loads(ok(cloud, "channels", "delete", "doomed", "--yes", "--json"))
    assert answer["deleted"] == "doomed"
    assert not opens(cloud, "doomed", token)
    gone = run_cli(cloud.url, "channels", "show", "doomed")
    assert gone.returncode == 1
    assert gone.stderr.startswith("webhook-connect channels: 404 unknown_channel")


def test_json_output_is_the_api_answer(cloud: Cloud) -> None:
    """--json prints the API's answer, parseable as it is."""
    answer = json.loads(ok(cloud, "channels", "list", "--json"))
    assert "dev" in [channel["name"] for channel in answer["channels"]]


def test_admin_token_and_cloud_url_failures(cloud: Cloud) -> None:
    """Exit 2 for usage (no admin token, a bad limit), 1 for a refusal or no cloud."""
    missing = run_cli(cloud.url, "channels", "list", admin_token=None)
    assert missing.returncode == 2
    assert "no admin token" in missing.stderr
    assert "WEBHOOK_CONNECT_ADMIN_TOKEN" in missing.stderr

    wrong = run_cli(cloud.url, "channels", "list", admin_token="not-the-admin-token-0123")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("webhook-connect channels: 401 unauthorized")

    connector = run_cli(cloud.url, "dlq", "list", "dev", admin_token=DEV_TOKEN)
    assert connector.returncode == 1
    assert connector.stderr.startswith("webhook-connect dlq: 401 unauthorized")

    nowhere = f"http://127.0.0.1:{free_port()}"
    unreachable = run_cli(nowhere, "channels", "list")
    assert unreachable.returncode == 1
    assert f"cannot reach the cloud at {nowhere}" in unreachable.stderr

    usage = run_cli(cloud.url, "channels", "create", "x", "--max-queue-size", "0")
    assert usage.returncode == 2


# dlq ----------------------------------------------------------------------------------------


def take(cloud: Cloud, connection_id: str | None, count: int) -> tuple[str, list[dict[str, Any]]]:
    """Long-poll ``dev`` until ``count`` messages came; return the connection and them."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 15
    while len(messages) < count:
        assert time.monotonic() < deadline, f"got {len(messages)} of {count} messages"
        answer = poll(cloud, "dev", DEV_TOKEN, connection_id, timeout=2)
        assert answer.status_code in (200, 204), answer.text
        connection_id = answer.headers.get("x-connection-id") or connection_id
        if answer.status_code == 200:
            connection_id = answer.json()["connection_id"]
            messages += answer.json()["messages"]
    assert connection_id is not None
    return connection_id, messages


def settle(cloud: Cloud, connection_id: str, message_id: str, **body: Any) -> None:
    headers = {"Authorization": f"Bearer {DEV_TOKEN}", "X-Connection-ID": connection_id}
    answer = httpx.post(
        f"{cloud.url}/connect/ack", json={"message_id": message_id, **body}, headers=headers
    )
    assert answer.status_code == 200, answer.text


def dead_letter(cloud: Cloud, connection_id: str, message_id: str) -> None:
    settle(cloud, connection_id, message_id, status="nack", retry=False, reason="http_400")


def test_dead_letters_list_show_replay_purge(cloud: Cloud) -> None:
    """Two nacked webhooks (text and binary) through dlq list, show, replay and purge."""
    text, binary = b'{"order": 1}', b"\xff\x00\xfe binary"
    for body in (text, binary):
        assert httpx.post(f"{cloud.url}/webhook/dev", content=body).status_code == 202
    connection_id, messages = take(cloud, None, 2)
    for message in messages:
        dead_letter(cloud, connection_id, message["message_id"])
    ids = {json.dumps(message["payload"]): message["message_id"] for message in messages}
    text_id, binary_id = ids.pop(json.dumps({"order": 1})), ids.popitem()[1]

    listed = ok(cloud, "dlq", "list", "dev")
    assert re.search(rf"^{text_id}\s+default\s+http_400\s+1\s", listed, re.MULTILINE)
    assert re.search(rf"^{binary_id}\s.*\s{len(binary)} B$", listed, re.MULTILINE)
    assert ISO_TIME.search(listed)

    shown = ok(cloud, "dlq", "show", "dev", text_id)
    assert shown.rstrip().endswith('body: 12 bytes, UTF-8 text:\n{"order": 1}')
    assert re.search(r"^reason\s+http_400$", shown, re.MULTILINE)
    # The attempts table: ATTEMPT TIME CONNECTOR_ID CONNECTION_ID OUTCOME STATUS_CODE DURATION
    attempt = rf"^  1\s+{ISO_TIME.pattern}\s+-\s+{connection_id}\s+http_400\s+400\s+[\d.]+$"
    assert re.search(attempt, shown, re.MULTILINE), shown
    shown = ok(cloud, "dlq", "show", "dev", binary_id)
    assert f"body: {len(binary)} bytes, not UTF-8, base64:" in shown
    assert base64.b64encode(binary).decode() in shown
    answer = json.loads(ok(cloud, "dlq", "show", "dev", binary_id, "--json"))
    assert base64.b64decode(answer["body_base64"]) == binary

    neither = run_cli(cloud.url, "dlq", "replay", "dev")
    assert neither.returncode == 2
    assert "--all" in neither.stderr

    assert ok(cloud, "dlq", "replay", "dev", text_id).strip() == "replayed 1"
    connection_id, again = take(cloud, connection_id, 1)
    assert [message["payload"] for message in again] == [{"order": 1}]
    settle(cloud, connection_id, again[0]["message_id"], status="ack")

    assert ok(cloud, "dlq", "replay", "dev", "--all").strip() == "replayed 1"
    connection_id, again = take(cloud, connection_id, 1)
    dead_letter(cloud, connection_id, again[0]["message_id"])

    kept = run_cli(cloud.url, "dlq", "purge", "dev", "--all", answer="n\n")
    assert kept.returncode == 1
    assert again[0]["message_id"] in ok(cloud, "dlq", "list", "dev")
    assert ok(cloud, "dlq", "purge", "dev", "--all", "--yes").strip() == "purged 1"
    assert ok(cloud, "dlq", "list", "dev").strip() == "no dead letters"

    unknown = run_cli(cloud.url, "dlq", "show", "dev", "no-such-message")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("webhook-connect dlq: 404 unknown_dead_letter")
