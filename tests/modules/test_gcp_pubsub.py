"""The ``gcp_pubsub`` module against a stand-in for Pub/Sub's REST API and Google's token
endpoint (see ``pubsub_standin.py`` for what it checks), read back with the pull API."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import ValidationError

from tests.modules.cloud_peers import (
    BINARY_BODY,
    JSON_BODY,
    SERVICE_ACCOUNT,
    PubSubStandIn,
    make_message,
    new_private_key,
)
from tests.servers import running
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.exceptions import ConfigError
from webhook_connect.shared.modules.base import Permanent, Pools, Transient
from webhook_connect.shared.modules.gcp_auth import (
    REFRESH_MARGIN,
    AccessToken,
    ServiceAccount,
    assertion,
)
from webhook_connect.shared.modules.gcp_pubsub import (
    MAX_MESSAGES,
    PubSubConfig,
    PubSubModule,
    requests,
)
from webhook_connect.shared.modules.registry import module_class


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubStandIn]:
    with running(PubSubStandIn(tmp_path_factory.mktemp("pubsub"))) as server:
        yield server


@pytest.fixture
async def make_module(
    standin: PubSubStandIn, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., PubSubModule]]:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    pools = Pools()
    made: list[PubSubModule] = []

    def make(connection: dict[str, Any] | None = None, **config: Any) -> PubSubModule:
        settings = {"type": "gcp_pubsub", **(connection or {})}
        entry = ConnectionEntry.model_validate(settings)
        made.append(PubSubModule(PubSubConfig.model_validate(config), entry, pools))
        return made[-1]

    yield make
    for module in made:
        await module.aclose()
    await pools.aclose()


def data(message: dict[str, Any]) -> bytes:
    return base64.b64decode(message["data"])


async def test_emulator_mode_publishes_the_exact_bytes_with_attributes(
    standin: PubSubStandIn,
    make_module: Callable[..., PubSubModule],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    standin.create("raw")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{standin.port}")
    module = make_module(topic="raw", project_id="proj", attributes={"source": "relay"})
    await module.start()
    anonymous = standin.stats().get("anonymous_publishes", 0)
    await module.deliver(make_message("m-1", BINARY_BODY))

    [message] = standin.pull("raw")
    assert data(message) == BINARY_BODY
    attributes = message["attributes"]
    assert attributes["message-id"] == "m-1"
    assert attributes["webhook-id"] == "stripe"
    assert attributes["channel"] == "payments"
    assert attributes["received-at"] == "2026-08-28T14:05:33.123456Z"
    assert attributes["source"] == "relay"
    assert json.loads(attributes["headers"])[-1] == ["X-Seen", "two"]
    assert message["messageId"]
    assert standin.stats()["anonymous_publishes"] == anonymous + 1


async def test_service_account_token_is_exchanged_once_and_reused(
    standin: PubSubStandIn, make_module: Callable[..., PubSubModule]
) -> None:
    standin.create("signed")
    key = standin.key_file()
    connection = {"credentials_path": str(key), "endpoint": standin.url}
    module = make_module(connection, topic="signed", ordering_key="stripe")
    before = standin.stats()
    await asyncio.gather(*(module.deliver(make_message(f"m-{i}", JSON_BODY)) for i in range(30)))
    await module.deliver(make_message("last", JSON_BODY))

    after = standin.stats()
    assert after.get("tokens_issued", 0) == before.get("tokens_issued", 0) + 1
    assert after.get("anonymous_publishes", 0) == before.get("anonymous_publishes", 0)
    assert after["token_publishes"] > before.get("token_publishes", 0)
    messages = standin.pull("signed")
    assert len(messages) == 31
    assert all(data(m) == JSON_BODY and m["orderingKey"] == "stripe" for m in messages)


async def test_tokens_are_refreshed_near_expiry_and_after_a_refusal(
    standin: PubSubStandIn, make_module: Callable[..., PubSubModule]
) -> None:
    standin.create("refresh")
    connection = {"credentials_path": str(standin.key_file()), "endpoint": standin.url}
    module = make_module(connection, topic="refresh")
    issued = standin.stats().get("tokens_issued", 0)
    await module.deliver(make_message("a"))

    standin.control(revoke_tokens=True)
    with pytest.raises(Transient, match="401"):
        await module.deliver(make_message("b"))
    standin.control(token_lifetime=REFRESH_MARGIN - 10)  # already inside the refresh margin
    try:
        await module.deliver(make_message("b"))
        await module.deliver(make_message("c"))
    finally:
        standin.control(token_lifetime=3599)
    assert standin.stats()["tokens_issued"] == issued + 3
    assert [m["attributes"]["message-id"] for m in standin.pull("refresh")] == ["a", "b", "c"]


async def test_a_key_the_token_endpoint_refuses_is_transient(
    standin: PubSubStandIn, make_module: Callable[..., PubSubModule], tmp_path: Path
) -> None:
    standin.create("wrong-key")
    _, pem = new_private_key()
    connection = {"credentials_path": str(standin.key_file(pem)), "endpoint": standin.url}
    module = make_module(connection, topic="wrong-key")
    with pytest.raises(Transient, match="invalid_grant"):
        await module.deliver(make_message())
    assert standin.pull("wrong-key") == []


async def test_concurrent_delivers_share_publish_calls(
    standin: PubSubStandIn, make_module: Callable[..., PubSubModule]
) -> None:
    standin.create("busy")
    module = make_module({"endpoint": standin.url}, topic="projects/proj/topics/busy")
    calls = standin.stats().get("anonymous_publishes", 0)
    sent = {f"m-{i}": bytes([i % 256]) * (i + 1) for i in range(300)}
    await asyncio.gather(*(module.deliver(make_message(k, v)) for k, v in sent.items()))

    assert standin.stats()["anonymous_publishes"] - calls <= 5
    received = {m["attributes"]["message-id"]: data(m) for m in standin.pull("busy")}
    assert received == sent


async def test_a_refused_message_is_permanent_and_spares_its_batch(
    standin: PubSubStandIn, make_module: Callable[..., PubSubModule]
) -> None:
    standin.create(
        "typed", schemaSettings={"schema": "projects/proj/schemas/s", "encoding": "JSON"}
    )
    module = make_module({"endpoint": standin.url}, topic="typed", project_id="proj")
    bodies = [JSON_BODY, b"not json", JSON_BODY, JSON_BODY]
    outcomes = await asyncio.gather(
        *(module.deliver(make_message(f"m-{i}", b)) for i, b in enumerate(bodies)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], Permanent)
    assert "schema validation" in str(outcomes[1])
    assert [outcomes[0], outcomes[2], outcomes[3]] == [None, None, None]
    assert sorted(m["attributes"]["message-id"] for m in standin.pull("typed")) == [
        "m-0",
        "m-2",
        "m-3",
    ]


async def test_large_headers_are_left_out_with_a_note(
    standin: PubSubStandIn, make_module: Callable[..., PubSubModule]
) -> None:
    standin.create("big-headers")
    module = make_module({"endpoint": standin.url}, topic="big-headers", project_id="proj")
    await module.deliver(make_message(headers=(("X-Big", "v" * 2000),)))
    [message] = standin.pull("big-headers")
    assert "headers" not in message["attributes"]
    assert "over the Pub/Sub 1 KB limit" in message["attributes"]["headers-omitted"]


async def test_unknown_topic_is_transient_until_created(
    standin: PubSubStandIn, make_module: Callable[..., PubSubModule]
) -> None:
    module = make_module({"endpoint": standin.url}, topic="later", project_id="proj")
    with pytest.raises(Transient, match="404"):
        await module.deliver(make_message())
    standin.create("later")
    await module.deliver(make_message("now"))
    assert [m["attributes"]["message-id"] for m in standin.pull("later")] == ["now"]


async def test_server_down_is_transient_and_a_restart_needs_no_new_module(
    standin: PubSubStandIn, make_module: Callable[..., PubSubModule]
) -> None:
    standin.create("restart")
    module = make_module({"endpoint": standin.url}, topic="restart", project_id="proj")
    await module.deliver(make_message("before"))
    standin.stop()
    try:
        with pytest.raises(Transient):
            await module.deliver(make_message("during"))
    finally:
        standin.start()
    standin.create("restart")  # the stand-in, like the emulator, forgets everything

    await module.deliver(make_message("after", BINARY_BODY))
    [message] = standin.pull("restart")
    assert data(message) == BINARY_BODY


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({}, "topic"),
        ({"topic": "x"}, "topic"),
        ({"topic": "ok-topic", "attributes": {"googkey": "v"}}, "not starting goog"),
        ({"topic": "ok-topic", "attributes": {"k": "v" * 1025}}, "at most 1024 bytes"),
        ({"topic": "ok-topic", "ordering_key": "k" * 1025}, "ordering keys"),
        ({"topic": "ok-topic", "queue": "q"}, "Extra inputs"),
    ],
)
def test_a_bad_module_config_is_refused(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        PubSubConfig.model_validate(config)


@pytest.mark.parametrize(
    ("connection", "error"),
    [
        ({}, "no credentials_path"),
        ({"credentials_path": "/nonexistent/key.json"}, "cannot read"),
        ({"endpoint": "http://127.0.0.1:1"}, "no project_id"),
        ({"endpoint": "localhost:8085", "project_id": "p"}, "endpoint"),
    ],
)
async def test_a_bad_connection_is_refused(
    make_module: Callable[..., PubSubModule], connection: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        make_module(connection, topic="ok-topic")


async def test_a_broken_key_file_is_refused_at_start_up(
    make_module: Callable[..., PubSubModule], tmp_path: Path
) -> None:
    path = tmp_path / "key.json"
    path.write_text(
        json.dumps({"client_email": SERVICE_ACCOUNT, "private_key": "junk", "project_id": "p"})
    )
    with pytest.raises(ConfigError, match="not a PEM private key"):
        make_module({"credentials_path": str(path)}, topic="ok-topic")
    path.write_text(json.dumps({"private_key": "junk"}))
    with pytest.raises(ConfigError, match="client_email"):
        make_module({"credentials_path": str(path)}, topic="ok-topic")


def test_the_registry_loads_the_module() -> None:
    assert module_class("gcp_pubsub") is PubSubModule


def test_the_assertion_is_what_google_expects() -> None:
    key, pem = new_private_key()
    account = ServiceAccount.model_validate(
        {"client_email": SERVICE_ACCOUNT, "private_key": pem, "private_key_id": "kid-9"}
    )
    signed = assertion(account, "scope-a", now=1_000_000)
    assert jwt.get_unverified_header(signed) == {"alg": "RS256", "typ": "JWT", "kid": "kid-9"}
    claims = jwt.decode(
        signed,
        key.public_key(),
        ["RS256"],
        audience=account.token_uri,
        options={"verify_exp": False},
    )
    assert claims == {
        "iss": SERVICE_ACCOUNT,
        "scope": "scope-a",
        "aud": "https://oauth2.googleapis.com/token",
        "iat": 1_000_000,
        "exp": 1_003_600,
    }
    token = AccessToken("t", expires_at=1_003_600)
    assert token.is_fresh(1_003_600 - REFRESH_MARGIN - 1)
    assert not token.is_fresh(1_003_600 - REFRESH_MARGIN)


def test_requests_respect_the_count_and_size_limits() -> None:
    assert [len(g) for g in requests([b"x"] * (MAX_MESSAGES + 5))] == [MAX_MESSAGES, 5]
    big = b"x" * 6_000_000
    assert requests([big, big, b"x"]) == [[0], [1, 2]]
