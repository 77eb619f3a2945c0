"""Our connector against the Core Webhook Module's cloud (issue 14, item 4).

The cloud here is ``tests/core_cloud_standin.py``, a real server on a loopback port that speaks
that project's frames as its documentation describes them; the connector is the real
``webhook-connect connector`` process, delivering to a real sink.
"""

from __future__ import annotations

import base64
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.core_cloud_standin import CoreCloudStandin
from tests.servers import ConnectorProcess, Sink, running, wait_until
from webhook_connect.shared.frames import FrameError, decode_seed_message, seed_body

TOKEN = "core-channel-token-0123"


@pytest.fixture(params=["websocket", "sse"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["flat", "nested"])
def standin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CoreCloudStandin]:
    """Flat: the frame its cloud sends; nested: the request under ``data``, as its
    specification draws it."""
    with running(CoreCloudStandin(tmp_path, "dev", TOKEN, shape=request.param)) as server:
        yield server


class Connectors(list[ConnectorProcess]):
    pass


@pytest.fixture
def connectors() -> Iterator[Connectors]:
    started = Connectors()
    try:
        yield started
    finally:
        for process in started:
            process.stop(signal.SIGKILL)


def start_connector(
    connectors: Connectors,
    url: str,
    sink: Sink,
    workdir: Path,
    protocol: str,
    token: str = TOKEN,
    wait: bool = True,
) -> ConnectorProcess:
    settings = {
        "protocol": protocol,
        "cloud_url": url,
        "channel": "dev",
        "token": token,
        "connector_id": "ours",
        "state_dir": str(workdir / "state"),
        "reconnect_delay_seconds": 0.2,
        "max_reconnect_delay_seconds": 0.5,
        "default_target": {"url": sink.url, "timeout_seconds": 5, "retry_max_attempts": 1},
    }
    process = ConnectorProcess(workdir, settings)
    connectors.append(process)
    process.start()
    if wait:
        wait_until(lambda: "connected to" in process.output(), 20, "the connector to connect")
    return process


def headers_of(record: dict[str, Any]) -> dict[str, str]:
    return {str(name).lower(): str(value) for name, value in record["headers"]}


def message_id_of(record: dict[str, Any]) -> str:
    return headers_of(record)["x-webhook-connect-message-id"]


def test_webhooks_arrive_and_every_ack_reaches_the_cloud(
    standin: CoreCloudStandin,
    sink: Sink,
    connectors: Connectors,
    protocol: str,
    tmp_path: Path,
) -> None:
    connector = start_connector(connectors, standin.url, sink, tmp_path, protocol)
    sent = {
        standin.post(
            "github",
            b'{"action":"opened","n":[1,2.5,"\\u00e9"]}',
            {"Content-Type": "application/json", "X-GitHub-Event": "push"},
        ): (b'{"action": "opened", "n": [1, 2.5, "\\u00e9"]}', "application/json"),
        standin.post("github", b"plain text", {"Content-Type": "text/plain"}): (
            b"plain text",
            "text/plain",
        ),
    }
    for i in range(20):
        sent[
            standin.post("bulk", f'{{"i":{i}}}'.encode(), {"Content-Type": "application/json"})
        ] = (
            f'{{"i": {i}}}'.encode(),
            "application/json",
        )

    wait_until(lambda: len(sink.records()) >= len(sent), 20, "every webhook at the sink")
    wait_until(lambda: len(standin.events("ack")) >= len(sent), 20, "every ack at the cloud")
    records = sink.records()
    assert sorted(message_id_of(r) for r in records) == sorted(sent)  # each once
    for record in records:
        body, content_type = sent[message_id_of(record)]
        # The seed cloud hands the body on parsed: it arrives re-encoded, as that project's
        # own connector would send it; the request's headers travel with it.
        assert base64.b64decode(str(record["body_b64"])) == body
        assert headers_of(record)["content-type"] == content_type
        assert record["method"] == "POST"
    github = next(r for r in records if headers_of(r).get("x-github-event") == "push")
    assert not github["query"]  # its frames carry no query string

    acks = standin.events("ack")
    assert sorted(a["message_id"] for a in acks) == sorted(sent)
    assert all(a["held"] for a in acks), "an ack named a message its connection did not hold"
    assert not standin.events("refused_ack")
    if protocol == "sse":
        for event in acks:  # its ack route reads the query string, one message per request
            assert f"message_id={event['message_id']}" in event["query"]
            assert "status=ack" in event["query"]
            assert event["connection_id"].startswith("sse_")
    else:
        assert all(a["frame"] == {"type": "ack", "message_id": a["message_id"]} for a in acks)
    state = standin.state()
    assert state["queued"] == state["in_flight"] == state["dead"] == []
    assert "seed dialect" in connector.output()


def test_a_rejecting_target_nacks_without_retry(
    standin: CoreCloudStandin, connectors: Connectors, protocol: str, tmp_path: Path
) -> None:
    with running(Sink(tmp_path, status=400)) as rejecting:
        start_connector(connectors, standin.url, rejecting, tmp_path, protocol)
        message_id = standin.post("github", b'{"bad": true}', {"Content-Type": "application/json"})
        wait_until(lambda: standin.state()["dead"] == [message_id], 20, "the dead letter")
    [nack] = standin.events("nack")
    assert (nack["message_id"], nack["retry"], nack["held"]) == (message_id, False, True)
    if protocol == "sse":
        assert "status=nack" in nack["query"] and "retry=false" in nack["query"]
    else:
        assert nack["frame"]["type"] == "nack" and nack["frame"]["retry"] is False
    assert not standin.events("ack")


def test_a_failing_target_nacks_for_a_retry_and_the_message_comes_back(
    standin: CoreCloudStandin, connectors: Connectors, protocol: str, tmp_path: Path
) -> None:
    with running(Sink(tmp_path, status=503)) as failing:
        connector = start_connector(connectors, standin.url, failing, tmp_path, protocol)
        message_id = standin.post("github", b"{}", {"Content-Type": "application/json"})
        wait_until(lambda: len(standin.events("nack")) >= 2, 20, "two nacks with retry")
        connector.stop()
    nacks = standin.events("nack")
    assert {n["message_id"] for n in nacks} == {message_id}
    assert all(n["retry"] is True and n["held"] for n in nacks)
    if protocol == "sse":
        assert all("retry=true" in n["query"] for n in nacks)


def test_the_connector_reconnects_after_the_cloud_restarts(
    sink: Sink, connectors: Connectors, protocol: str, tmp_path: Path
) -> None:
    standin = CoreCloudStandin(tmp_path, "dev", TOKEN)
    with running(standin):
        connector = start_connector(connectors, standin.url, sink, tmp_path, protocol)
        standin.post("github", b'{"before": 1}', {"Content-Type": "application/json"})
        wait_until(lambda: len(sink.records()) == 1, 20, "the first webhook")
        standin.stop()
        wait_until(lambda: "connection lost" in connector.output(), 20, "the drop to be seen")
        standin.start()  # same port, empty: its cloud would have kept the queue in Redis
        wait_until(lambda: connector.output().count("connected to") >= 2, 20, "a reconnect")
        after = standin.post("github", b'{"after": 2}', {"Content-Type": "application/json"})
        wait_until(lambda: len(sink.records()) == 2, 20, "the webhook sent after the restart")
        wait_until(lambda: len(standin.events("ack")) == 1, 20, "its ack")
    assert message_id_of(sink.records()[1]) == after
    assert connector.process is not None and connector.process.poll() is None


def test_a_wrong_token_is_fatal_with_a_clear_line(
    sink: Sink, connectors: Connectors, protocol: str, tmp_path: Path
) -> None:
    """Over SSE its cloud says 401 with its JSON error: fatal. Over the WebSocket it closes
    before the upgrade, which reaches the connector as a bare 403, the same answer a proxy
    gives: retried with backoff (issue 15, staying up), each attempt logged with what came
    back."""
    with running(CoreCloudStandin(tmp_path, "dev", TOKEN)) as standin:
        connector = start_connector(
            connectors, standin.url, sink, tmp_path, protocol, token="wrong-token", wait=False
        )
        if protocol == "websocket":
            said = "not the cloud's refusal of the token"
            wait_until(lambda: connector.output().count(said) >= 2, 20, "two attempts")
            assert "cannot connect: HTTP 403" in connector.output()
            assert connector.process is not None and connector.process.poll() is None
            return
        assert connector.wait() == 1
    assert "refused" in connector.output()


def test_a_frame_without_a_message_id_is_skipped_and_the_stream_goes_on(
    standin: CoreCloudStandin, sink: Sink, connectors: Connectors, protocol: str, tmp_path: Path
) -> None:
    connector = start_connector(connectors, standin.url, sink, tmp_path, protocol)
    nameless = {"type": "webhook", "sequence": 1, "webhook_id": "github", "headers": {}}
    standin.post_raw({**nameless, "payload": {"no": "id"}})
    standin.post_raw({**nameless, "message_id": 42, "payload": {"bad": "id"}})
    good = standin.post("github", b'{"ok": 1}', {"Content-Type": "application/json"})
    wait_until(lambda: len(standin.events("ack")) == 1, 20, "the good message's ack")
    assert [message_id_of(r) for r in sink.records()] == [good]
    output = connector.output()
    assert output.count("skipped a") == 2 and "without a usable message_id" in output
    assert output.count("connected to") == 1, "a bad frame must not cost the connection"


def test_long_poll_against_it_stops_with_a_clear_line(
    sink: Sink, connectors: Connectors, tmp_path: Path
) -> None:
    """Its long-poll forgets the connection as it answers, so no ack could ever settle a
    message: the connector says so and stops instead of delivering it again forever."""
    with running(CoreCloudStandin(tmp_path, "dev", TOKEN)) as standin:
        standin.post("github", b"{}", {"Content-Type": "application/json"})
        connector = start_connector(
            connectors, standin.url, sink, tmp_path, "long_poll", wait=False
        )
        assert connector.wait() == 1
    assert "use protocol websocket or sse" in connector.output()
    assert sink.records() == []


# The seed frame read as a message (pure) ------------------------------------------------------


def test_a_flat_and_a_nested_frame_read_the_same() -> None:
    request = {
        "webhook_id": "stripe",
        "timestamp": "2026-01-16T10:30:00.123000+00:00",
        "headers": {"X-Stripe-Signature": "t=1,v1=ab", "content-length": "12"},
        "payload": {"id": "evt_1", "amount": 12.5},
    }
    flat = decode_seed_message(
        {"type": "webhook", "message_id": "msg_1", "sequence": 7, **request}, "pay", 0.0
    )
    nested = decode_seed_message(
        {"type": "webhook", "message_id": "msg_1", "sequence": 7, "data": request}, "pay", 0.0
    )
    assert flat == nested
    assert (flat.message_id, flat.sequence, flat.attempt, flat.channel) == ("msg_1", 7, 1, "pay")
    envelope = flat.envelope
    assert envelope.body == b'{"id": "evt_1", "amount": 12.5}'
    assert envelope.received_at == pytest.approx(1768559400.123)
    assert (envelope.method, envelope.path, envelope.query_string) == (
        "POST",
        "/webhook/stripe",
        "",
    )
    assert ("Content-Type", "application/json") in envelope.headers
    assert ("X-Stripe-Signature", "t=1,v1=ab") in envelope.headers


@pytest.mark.parametrize(
    ("payload", "body"),
    [
        ("<xml/>", b"<xml/>"),
        ("caf\u00e9", "caf\u00e9".encode()),
        (None, b""),
        ([1, True, None], b"[1, true, null]"),
        (3, b"3"),
    ],
)
def test_payloads_become_the_bytes_its_connector_would_send(payload: Any, body: bytes) -> None:
    assert seed_body(payload) == body


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "webhook", "payload": {}},
        {"type": "webhook", "message_id": "", "payload": {}},
        {"type": "webhook", "message_id": 12, "payload": {}},
        {"type": "webhook", "message_id": "x" * 201},
        ["not", "an", "object"],
    ],
)
def test_a_frame_without_a_usable_id_is_refused(frame: Any) -> None:
    with pytest.raises(FrameError, match="message_id|object"):
        decode_seed_message(frame, "dev", 0.0)


def test_missing_fields_and_a_bad_timestamp_are_tolerated() -> None:
    message = decode_seed_message(
        {"message_id": "msg_2", "timestamp": "yesterday", "sequence": "9"}, "dev", 42.0
    )
    assert (message.sequence, message.envelope.received_at, message.envelope.body) == (0, 42.0, b"")
    assert message.envelope.webhook_id == ""
