"""One HTTP refusal (shared/exceptions.py HttpRefusal) and one answer to it
(cloud/responses.py refusal_response), whichever surface refused: ingest, admin API, /docs."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import orjson
from starlette.types import Message

from tests.servers import Cloud, running
from webhook_connect.cloud.responses import refusal_response
from webhook_connect.cloud.security.inbound import Rejected
from webhook_connect.shared.exceptions import HttpRefusal, WebhookConnectError

ADMIN = "refusals-admin-token-0123"
WEBHOOKS = {
    "open": {
        "module": "webhook_connect",
        "module-config": {"channel": "c", "channel_token": "t" * 8},
    },
    "keyed": {
        "module": "webhook_connect",
        "basic_auth": {"username": "u", "password": "p"},
        "module-config": {"channel": "c", "channel_token": "t" * 8},
    },
}


def test_the_refusal_is_a_webhook_connect_error_and_the_checks_raise_it() -> None:
    assert Rejected is HttpRefusal
    assert issubclass(HttpRefusal, WebhookConnectError)


async def test_the_answer_carries_status_body_and_every_header() -> None:
    refusal = HttpRefusal(
        401,
        "unauthorized",
        {"why": "ünïcode"},
        [(b"www-authenticate", b'Digest realm="a"'), (b"www-authenticate", b'Basic realm="a"')],
    )
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        raise AssertionError("a refusal reads nothing")

    await refusal_response(refusal)({"type": "http"}, receive, send)
    start, body = sent
    assert start["status"] == 401
    headers = start["headers"]
    assert [v for k, v in headers if k == b"www-authenticate"] == [
        b'Digest realm="a"',
        b'Basic realm="a"',
    ]
    assert (b"content-type", b"application/json") in headers
    assert orjson.loads(body["body"]) == {"error": "unauthorized", "detail": {"why": "ünïcode"}}
    assert (b"content-length", str(len(body["body"])).encode()) in headers


def start(tmp_path: Path, *extra: str) -> Cloud:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    return Cloud(f"sqlite:///{tmp_path / 'b.db'}", path, tmp_path, *extra)


def test_every_surface_answers_a_refusal_the_same_way(tmp_path: Path) -> None:
    with running(start(tmp_path, "--admin-token", ADMIN)) as cloud:
        answers = {
            "unknown webhook": httpx.post(f"{cloud.url}/webhook/nope", content=b"{}"),
            "method": httpx.put(f"{cloud.url}/webhook/open", content=b"{}"),
            "authentication": httpx.post(f"{cloud.url}/webhook/keyed", content=b"{}"),
            "admin token": httpx.get(f"{cloud.url}/admin/channels"),
            "admin 404": httpx.get(
                f"{cloud.url}/admin/channels/none", headers={"authorization": f"Bearer {ADMIN}"}
            ),
            "docs": httpx.get(f"{cloud.url}/docs"),
        }
        for what, answer in answers.items():
            assert answer.headers["content-type"] == "application/json", what
            assert set(answer.json()) == {"error", "detail"}, what
        assert (answers["unknown webhook"].status_code, answers["unknown webhook"].json()) == (
            404,
            {"error": "unknown_webhook", "detail": "no webhook with this id"},
        )
        assert answers["method"].status_code == 405
        assert answers["method"].headers["allow"] == "POST"
        assert answers["authentication"].status_code == 401
        assert answers["authentication"].headers["www-authenticate"].startswith("Basic")
        assert answers["admin token"].status_code == 401
        assert answers["admin token"].headers["www-authenticate"] == (
            'Bearer realm="webhook-connect-admin"'
        )
        assert answers["admin 404"].json()["error"] == "unknown_channel"
        assert (answers["docs"].status_code, answers["docs"].json()["error"]) == (
            404,
            "docs_disabled",
        )


def test_without_an_admin_token_the_admin_api_is_off(tmp_path: Path) -> None:
    with running(start(tmp_path)) as cloud:
        answer = httpx.get(f"{cloud.url}/admin/channels")
        assert (answer.status_code, answer.json()["error"]) == (404, "admin_disabled")
