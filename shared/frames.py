"""Wire frames between cloud and connector, as pure encode/decode functions.

Two dialects share one WebSocket endpoint (see ``docs/PROTOCOL.md``):

* **seed**: the Core Webhook Module's JSON text frames (``connected``, ``webhook`` with the
  body as parsed JSON or text, ``heartbeat``; acks one id at a time). Lossy for binary bodies.
* **native** (subprotocol ``webhook-connect.v1``): byte-exact binary ``messages`` frames that
  carry several messages each, and batched acks.

Native binary frame: one or more records, each ``u32 meta length | meta JSON | u32 body length
| body``, lengths big-endian.
"""

from __future__ import annotations

import binascii
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from webhook_connect.shared.envelope import (
    WIRE_KEYS,
    Envelope,
    envelope_fields,
    envelope_from_fields,
)
from webhook_connect.shared.exceptions import FrameError as FrameError  # raised here

NATIVE_SUBPROTOCOL = "webhook-connect.v1"
MAX_ACK_IDS = 1000
_U32 = struct.Struct(">I")

# The fields of an ack or nack, the same over a WebSocket frame and ``POST /connect/ack``.
MessageId = Annotated[str, Field(max_length=200)]
NackReason = Annotated[str, Field(max_length=500)]


@dataclass(frozen=True, slots=True)
class WireMessage:
    """A message as the connector sees it: the stored envelope plus delivery facts."""

    message_id: str
    sequence: int
    attempt: int
    channel: str
    envelope: Envelope


# Client -> server ------------------------------------------------------------------------------


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def nack_reason(note: str, retry: bool) -> str:
    """The reason stored with a nack: the connector's own, else what it asked for."""
    return note or ("nack_retry" if retry else "nack")


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a connector says about messages it was sent, from any transport: acked, or
    nacked (``retry`` or dead-letter) with its own ``note``."""

    ids: tuple[str, ...]
    ack: bool = True
    retry: bool = True
    note: str = ""

    @property
    def reason(self) -> str:
        """The reason stored with a nack: the connector's, else what it asked for."""
        return nack_reason(self.note, self.retry)


class AckFrame(_Frame):
    type: Literal["ack"]
    message_id: MessageId | None = None
    message_ids: tuple[str, ...] = Field(default=(), max_length=MAX_ACK_IDS)

    def ids(self) -> tuple[str, ...]:
        return self.message_ids + ((self.message_id,) if self.message_id else ())

    def settlement(self) -> Settlement:
        return Settlement(self.ids())


class NackFrame(_Frame):
    type: Literal["nack"]
    message_id: MessageId
    retry: bool = True
    reason: NackReason = ""

    def settlement(self) -> Settlement:
        return Settlement((self.message_id,), ack=False, retry=self.retry, note=self.reason)


class AckRequest(_Frame):
    """The body of ``POST /connect/ack`` (SSE and long-poll): an ack or nack of one or more
    messages, the fields of :class:`AckFrame` and :class:`NackFrame` with ``status``."""

    message_id: MessageId | None = None
    message_ids: list[str] = Field(default_factory=list, max_length=MAX_ACK_IDS)
    status: Literal["ack", "nack"] = "ack"
    retry: bool = True
    reason: NackReason = ""

    def ids(self) -> list[str]:
        return [*self.message_ids, *([self.message_id] if self.message_id else [])]

    def settlement(self) -> Settlement:
        ack = self.status == "ack"
        return Settlement(tuple(self.ids()), ack=ack, retry=self.retry, note=self.reason)


# The fields an ack or nack may carry as query parameters instead of a JSON body.
ACK_QUERY_FIELDS = ("message_id", "status", "retry", "reason")


def ack_request_from_query(pairs: Iterable[tuple[str, str]]) -> AckRequest:
    """An ack or nack given as query parameters and no body, the form the Core Webhook
    Module's connector sends (``?message_id=…&status=ack``, ``&status=nack&retry=false``).

    The same model as a JSON body checks it, so a missing or malformed field gets the same
    answer either way; ``retry`` is read as ``true``/``false`` text. Parameters it does not
    know are ignored, as unknown JSON fields are. :class:`FrameError` if a field is repeated,
    pydantic's ``ValidationError`` if one is malformed.
    """
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name not in ACK_QUERY_FIELDS:
            continue
        if name in fields:
            raise FrameError(f"{name}: given more than once")
        fields[name] = value
    return AckRequest.model_validate(fields)


class HeartbeatFrame(_Frame):
    type: Literal["heartbeat", "ping"]


ClientFrame = AckFrame | NackFrame | HeartbeatFrame
_CLIENT_FRAMES: dict[str, type[AckFrame] | type[NackFrame] | type[HeartbeatFrame]] = {
    "ack": AckFrame,
    "nack": NackFrame,
    "heartbeat": HeartbeatFrame,
    "ping": HeartbeatFrame,
}


def parse_client_frame(text: str | bytes) -> ClientFrame:
    """Validate one client frame; :class:`FrameError` says what is wrong with it."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FrameError("a frame must be a JSON object")
    model = _CLIENT_FRAMES.get(str(data.get("type")))
    if model is None:
        raise FrameError(f"unknown frame type {data.get('type')!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise FrameError(f"{where}: {first['msg']}") from None


def encode_acks(message_ids: list[str]) -> bytes:
    return orjson.dumps({"type": "ack", "message_ids": message_ids})


def encode_nack(message_id: str, *, retry: bool, reason: str = "") -> bytes:
    return orjson.dumps(
        {"type": "nack", "message_id": message_id, "retry": retry, "reason": reason}
    )


# Server -> client ------------------------------------------------------------------------------


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def encode_connected(connection_id: str, channel: str, now: float, **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "type": "connected",
            "connection_id": connection_id,
            "channel": channel,
            "timestamp": iso_time(now),
            **extra,
        }
    )


def encode_heartbeat(now: float) -> bytes:
    return orjson.dumps({"type": "heartbeat", "timestamp": iso_time(now)})


def encode_error(error: str, **detail: Any) -> bytes:
    return orjson.dumps({"type": "error", "error": error, **detail})


def sse_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One Server-Sent Event: the frame SSE (and smee) streams carry a JSON ``data`` in."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head.encode() + b"data: " + data + b"\n\n"


def seed_payload(body: bytes) -> Any:
    """The body as the Core Webhook Module sends it: parsed JSON, else text."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return body.decode()
    except UnicodeDecodeError:
        return body.decode("latin-1")


def seed_message(message: WireMessage) -> dict[str, Any]:
    """A ``webhook`` frame of the seed dialect, as a JSON-ready dict."""
    envelope = message.envelope
    headers: dict[str, str] = {}
    for name, value in envelope.headers:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return {
        "type": "webhook",
        "message_id": message.message_id,
        "sequence": message.sequence,
        "webhook_id": envelope.webhook_id,
        "timestamp": iso_time(envelope.received_at),
        "headers": headers,
        "payload": seed_payload(envelope.body),
    }


def encode_seed_message(message: WireMessage) -> bytes:
    return orjson.dumps(seed_message(message))


def native_meta(message: WireMessage) -> dict[str, Any]:
    """A native message's fields but the body: the envelope's under the protocol's names."""
    return {
        "message_id": message.message_id,
        "sequence": message.sequence,
        "attempt": message.attempt,
        **envelope_fields(message.envelope, WIRE_KEYS),
    }


def encode_native_batch(messages: list[WireMessage]) -> bytes:
    """One binary frame holding every message, bodies raw."""
    parts: list[bytes] = []
    for message in messages:
        meta = orjson.dumps(native_meta(message))
        parts += (_U32.pack(len(meta)), meta, _U32.pack(len(message.envelope.body)))
        parts.append(message.envelope.body)
    return b"".join(parts)


def decode_native_batch(frame: bytes) -> list[WireMessage]:
    """Inverse of :func:`encode_native_batch`; :class:`FrameError` on a malformed frame."""
    messages: list[WireMessage] = []
    view = memoryview(frame)
    offset = 0
    try:
        while offset < len(view):
            (meta_len,) = _U32.unpack_from(view, offset)
            offset += 4
            meta = orjson.loads(view[offset : offset + meta_len])
            offset += meta_len
            (body_len,) = _U32.unpack_from(view, offset)
            offset += 4
            if offset + body_len > len(view):
                raise FrameError("truncated body")
            body = bytes(view[offset : offset + body_len])
            offset += body_len
            messages.append(_wire_message(meta, meta["timestamp"], body))
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, FrameError):
            raise
        raise FrameError(f"malformed messages frame: {exc}") from None
    return messages


def native_json(message: WireMessage) -> dict[str, Any]:
    """A byte-exact message as JSON (native SSE and long-poll): the body in base64, the time
    received both as ISO text (``timestamp``, as in seed frames) and as seconds."""
    envelope = message.envelope
    return {
        "type": "webhook",
        **native_meta(message),
        "timestamp": iso_time(envelope.received_at),
        "received_at": envelope.received_at,
        "body_b64": binascii.b2a_base64(envelope.body, newline=False).decode(),
    }


def decode_native_json(data: Any) -> WireMessage:
    """Inverse of :func:`native_json`; :class:`FrameError` if it is not one."""
    try:
        body = binascii.a2b_base64(data["body_b64"], strict_mode=True)
        return _wire_message(data, data["received_at"], body)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise FrameError(f"malformed message: {exc!r}") from None


# The Core Webhook Module's cloud, read by our connector -----------------------------------------


def seed_body(payload: Any) -> bytes:
    """The body a seed ``payload`` stands for: text as it is, anything else as JSON the way
    Python's ``json.dumps`` writes it (what that project's own connector sends its target).
    The original bytes are gone by then: only the parsed value travelled."""
    if isinstance(payload, str):
        return payload.encode()
    if payload is None:
        return b""
    return json.dumps(payload).encode()


def _seed_time(value: Any, now: float) -> float:
    if not isinstance(value, str):
        return now
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return now
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def decode_seed_message(data: Any, channel: str, now: float) -> WireMessage:
    """A seed ``webhook`` frame (or SSE event) as a message: flat, as the Core Webhook Module's
    cloud sends it, or with the request under ``data``, as its specification draws it.

    It carries no method, path, query or attempt: ``POST`` to ``/webhook/<webhook_id>``, no
    query and attempt 1 stand in; ``now`` stands in for a missing or unreadable timestamp.
    :class:`FrameError` when there is no message id to acknowledge it by."""
    if not isinstance(data, dict):
        raise FrameError("a webhook frame must be a JSON object")
    message_id = data.get("message_id")
    if not isinstance(message_id, str) or not message_id or len(message_id) > 200:
        raise FrameError(f"webhook frame without a usable message_id: {message_id!r}")
    inner = data.get("data")
    request = inner if isinstance(inner, dict) else data
    webhook_id = request.get("webhook_id", data.get("webhook_id", ""))
    raw_headers = request.get("headers")
    headers = [
        (str(name), str(value))
        for name, value in (raw_headers.items() if isinstance(raw_headers, dict) else ())
    ]
    payload = request.get("payload")
    if isinstance(payload, dict | list) and not any(
        name.lower() == "content-type" for name, _ in headers
    ):
        headers.append(("Content-Type", "application/json"))  # as its connector would set
    sequence = data.get("sequence")
    envelope = Envelope(
        channel=channel,
        webhook_id=str(webhook_id or ""),
        received_at=_seed_time(request.get("timestamp", data.get("timestamp")), now),
        method="POST",
        path=f"/webhook/{webhook_id}",
        query_string="",
        headers=tuple(headers),
        body=seed_body(payload),
    )
    return WireMessage(message_id, sequence if type(sequence) is int else 0, 1, channel, envelope)


def _wire_message(meta: Any, received_at: float, body: bytes) -> WireMessage:
    """A message from native meta fields (binary frame or JSON); KeyError if one is missing."""
    envelope = envelope_from_fields({**meta, "timestamp": received_at}, body, WIRE_KEYS)
    ids = (meta["message_id"], meta["sequence"], meta["attempt"], meta["channel"])
    return WireMessage(*ids, envelope)
