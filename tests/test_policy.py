"""Pure pieces, tested without any server: policy, frames, requests, the delivered log."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from webhook_connect.connector.config import Target
from webhook_connect.connector.dedup import DeliveredLog
from webhook_connect.connector.delivery import build_request
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.frames import (
    FrameError,
    WireMessage,
    decode_native_batch,
    encode_native_batch,
    parse_client_frame,
    seed_message,
)
from webhook_connect.shared.policy import (
    Backoff,
    Outcome,
    classify_status,
    parse_retry_after,
    retry_delay,
)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (301, Outcome.REJECTED),
        (400, Outcome.REJECTED),
        (401, Outcome.REJECTED),
        (404, Outcome.REJECTED),
        (422, Outcome.REJECTED),
    ],
)
def test_statuses_are_classified_as_the_product_says(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now) == pytest.approx(20)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now) == 0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_retry_delays_grow_and_honour_retry_after_within_the_cap() -> None:
    delays = [retry_delay(n, initial=1, multiplier=2, maximum=5) for n in (1, 2, 3, 4)]
    assert delays == [1, 2, 4, 5]
    assert retry_delay(1, initial=1, multiplier=2, maximum=5, retry_after=3) == 3
    assert retry_delay(1, initial=1, multiplier=2, maximum=5, retry_after=3600) == 5


def test_reconnect_backoff_has_jitter_a_cap_and_resets() -> None:
    backoff = Backoff(initial=1, maximum=8, multiplier=2)
    rng = random.Random(7)
    delays = [backoff.next_delay(rng) for _ in range(6)]
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base / 2 <= delay <= base
    assert len(set(delays)) == len(delays), "jitter spreads reconnecting connectors"
    backoff.reset()
    assert backoff.next_delay(rng) <= 1


def envelope(body: bytes = b'{"a": 1}') -> Envelope:
    return Envelope(
        channel="dev",
        webhook_id="github",
        received_at=1_700_000_000.5,
        method="POST",
        path="/webhook/github",
        query_string="a=1&b=%2F",
        headers=(
            ("Host", "cloud.example"),
            ("Content-Type", "application/json"),
            ("Content-Length", "8"),
            ("Connection", "keep-alive"),
            ("X-Hub-Signature-256", "s"),
            ("X-Dup", "1"),
            ("x-dup", "2"),
            ("X-Webhook-Connect-Attempt", "forged"),
        ),
        body=body,
    )


def test_native_frames_round_trip_every_byte() -> None:
    messages = [WireMessage(str(i), i, 1, "dev", envelope(bytes(range(256)) * i)) for i in range(4)]
    assert decode_native_batch(encode_native_batch(messages)) == messages


@pytest.mark.parametrize(
    "frame", [b"\x00\x00\x00\x05{}", b"\x00\x00\x00\x02{}\x00\x00\x01\x00ab", b"\xff"]
)
def test_truncated_native_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(FrameError):
        decode_native_batch(frame)


def test_seed_frames_carry_parsed_json_and_joined_headers() -> None:
    frame = seed_message(WireMessage("1-0", 3, 1, "dev", envelope()))
    assert frame["type"] == "webhook"
    assert frame["payload"] == {"a": 1}
    assert frame["headers"]["X-Dup"] == "1" and frame["headers"]["x-dup"] == "2"
    assert frame["timestamp"] == "2023-11-14T22:13:20.500000Z"
    text = seed_message(WireMessage("1-0", 3, 1, "dev", envelope(b"plain")))
    assert text["payload"] == "plain"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("garbage", "not JSON"),
        ("[1]", "JSON object"),
        ('{"type": "explode"}', "unknown frame type"),
        ('{"type": "nack"}', "message_id"),
        ('{"type": "ack", "message_ids": "abc"}', "message_ids"),
        ('{"type": "nack", "message_id": "1", "retry": "perhaps"}', "retry"),
    ],
)
def test_bad_client_frames_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(FrameError, match=problem):
        parse_client_frame(text)


def test_client_frames_of_both_dialects_parse() -> None:
    assert parse_client_frame('{"type": "ack", "message_id": "1"}').ids() == ("1",)  # type: ignore[union-attr]
    batch = parse_client_frame('{"type": "ack", "message_ids": ["1", "2"]}')
    assert batch.ids() == ("1", "2")  # type: ignore[union-attr]
    nack = parse_client_frame('{"type": "nack", "message_id": "1", "retry": false}')
    assert nack.retry is False  # type: ignore[union-attr]


def test_the_request_is_the_original_less_hop_by_hop_headers() -> None:
    message = WireMessage("1-0", 1, 2, "dev", envelope())
    target = Target(url="http://127.0.0.1:9000/hooks?static=1", headers={"X-Extra": "yes"})
    request = build_request(message, target, attempt=4)
    assert request.method == "POST"
    assert request.url == "http://127.0.0.1:9000/hooks?static=1&a=1&b=%2F"
    assert request.body == b'{"a": 1}'
    assert request.headers == [
        ("Content-Type", "application/json"),
        ("X-Hub-Signature-256", "s"),
        ("X-Dup", "1"),
        ("x-dup", "2"),
        ("X-Extra", "yes"),
        ("X-Webhook-Connect-Message-Id", "1-0"),
        ("X-Webhook-Connect-Attempt", "4"),
        ("X-Webhook-Connect-Channel", "dev"),
    ]
    fixed = build_request(message, Target(url="http://h/", method="PUT"), attempt=1)
    assert fixed.method == "PUT"


def test_the_delivered_log_survives_a_restart_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dev.delivered"
    log = DeliveredLog(path, capacity=10)
    for i in range(25):
        log.add(f"id-{i}")
    log.add("id-24")
    log.close()
    again = DeliveredLog(path, capacity=10)
    assert "id-24" in again and "id-15" in again
    assert "id-14" not in again
    assert len(again) == 10
    assert len(path.read_text().splitlines()) <= 20, "compacted"
    again.close()
