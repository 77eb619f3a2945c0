"""What every admin route shares: the admin token check, JSON bodies, errors, serialisers."""

from __future__ import annotations

import base64
import dataclasses
import hmac
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    ValidationError,
)
from starlette.requests import Request
from starlette.responses import Response

from webhook_connect.cloud.buffers import (
    ChannelSpec,
    ConnectionRecord,
    DeadLetter,
    Registry,
    TokenRecord,
)
from webhook_connect.cloud.responses import refusal_response
from webhook_connect.cloud.tokens import bearer_token
from webhook_connect.shared.config.webhooks import CHANNEL_NAME_PATTERN
from webhook_connect.shared.envelope import envelope_fields
from webhook_connect.shared.exceptions import HttpRefusal, StorageError
from webhook_connect.shared.limits import LIMIT_NAMES, optional_limits

Endpoint = Callable[[Request], Awaitable[Response]]
# Names in paths: also the channels of webhooks the cloud delivers itself ("_direct.<id>"),
# which can be looked at, never created through the API.
CHANNEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,135}$")


# Answered (cloud/responses.py) without running the endpoint; never raised, so no instance
# keeps the frames of a raise.
ADMIN_DISABLED = HttpRefusal(404, "admin_disabled", "start the cloud with --admin-token to use it")
UNAUTHORIZED = HttpRefusal(
    401,
    "unauthorized",
    "admin token required",
    [(b"www-authenticate", b'Bearer realm="webhook-connect-admin"')],
)
RETRY_STORAGE = [(b"retry-after", b"2")]


def has_admin_token(admin_token: str | None, request: Request) -> bool:
    """Whether ``request`` carries the admin token (never, when none is configured)."""
    if admin_token is None:
        return False
    given = bearer_token(request.headers.get("authorization")) or ""
    # Constant time; a connector token (or any other) never opens the admin API.
    return hmac.compare_digest(given.encode(), admin_token.encode())


def guarded(admin_token: str | None, endpoint: Endpoint) -> Endpoint:
    """``endpoint`` behind the admin token, with refusals and storage failures answered."""

    async def handle(request: Request) -> Response:
        if admin_token is None:
            return refusal_response(ADMIN_DISABLED)
        if not has_admin_token(admin_token, request):
            return refusal_response(UNAUTHORIZED)
        try:
            return await endpoint(request)
        except HttpRefusal as exc:
            return refusal_response(exc)
        except StorageError as exc:
            return refusal_response(
                HttpRefusal(503, "storage_unavailable", str(exc), RETRY_STORAGE)
            )

    return handle


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is ``{}``."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HttpRefusal(400, "bad_request", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpRefusal(400, "bad_request", "the body must be a JSON object")
    return body


def validated(model: type[Any], data: dict[str, Any]) -> Any:
    """``data`` as ``model``; the first problem is a 422 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "(body)"
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise HttpRefusal(422, "invalid", f"{field}: {message}") from None


def query_limit(request: Request, default: int, maximum: int) -> int:
    """The ``?limit=`` of a listing, 1..``maximum``; 422 otherwise."""
    try:
        limit = int(request.query_params.get("limit", default))
    except ValueError:
        raise HttpRefusal(422, "invalid", "limit: must be a whole number") from None
    if not 1 <= limit <= maximum:
        raise HttpRefusal(422, "invalid", f"limit: must be 1..{maximum}")
    return limit


def channel_name(request: Request) -> str:
    """The ``{channel}`` path parameter, refused unless it is a valid channel name."""
    name = str(request.path_params["channel"])
    if not CHANNEL_NAME.match(name):
        raise HttpRefusal(422, "invalid", "channel: 1-128 letters, digits, '.', '_' or '-'")
    return name


async def existing_channel(buffer: Registry, request: Request) -> ChannelSpec:
    name = channel_name(request)
    spec = await buffer.get_channel(name)
    if spec is None:
        raise HttpRefusal(404, "unknown_channel", f"no channel {name!r}")
    return spec


def token_json(record: TokenRecord) -> dict[str, Any]:
    return {
        "token_id": record.token_id,
        "label": record.label,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
    }


def connection_json(record: ConnectionRecord, in_flight: int) -> dict[str, Any]:
    return {
        "connection_id": record.connection_id,
        "connector_id": record.connector_id,
        "group": record.group,
        "transport": record.transport,
        "address": record.address,
        "connected_at": record.connected_at,
        "seen_at": record.seen_at,
        "token_id": record.token_id,
        "in_flight": in_flight,
        "delivered": record.delivered,
    }


def dead_letter_json(letter: DeadLetter, *, full: bool = False) -> dict[str, Any]:
    envelope = letter.envelope
    answer: dict[str, Any] = {
        "dead_letter_id": letter.dead_letter_id,
        "message_id": letter.message_id,
        "group": letter.group,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "dead_at": letter.dead_at,
        "webhook_id": envelope.webhook_id,
        "received_at": envelope.received_at,
        "method": envelope.method,
        "size": len(envelope.body),
        "delivery_attempts": [
            {
                "attempt": a.attempt,
                "time": a.time,
                "connector_id": a.connector,
                "connection_id": a.connection,
                "outcome": a.outcome,
                "status_code": a.status_code,
                "duration_seconds": round(a.duration, 3),
            }
            for a in letter.delivery_attempts
        ],
    }
    if full:
        fields = envelope_fields(envelope)
        answer.update({name: fields[name] for name in ("path", "query_string", "headers")})
        answer["body_base64"] = base64.b64encode(envelope.body).decode()
    return answer


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Limits as the admin API takes them (shared/limits.py): every one optional, left out (None)
# to keep the default on create and the current value on update.
ChannelLimits = optional_limits(
    "ChannelLimits", _Body, "Limits of a channel as the admin API takes them; every field optional."
)
NewChannel = optional_limits(
    "NewChannel",
    _Body,
    "A channel to create: its name, optional limits, and its first connector token.",
    name=(str, Field(pattern=CHANNEL_NAME_PATTERN)),
    token_label=(str, Field(default="", max_length=200)),
    token_expires_in_seconds=(PositiveFloat | None, None),
)


def applied_limits(limits: BaseModel, spec: ChannelSpec) -> ChannelSpec:
    """``spec`` with the limits given in ``limits`` (a :data:`ChannelLimits` or
    :data:`NewChannel`)."""
    given = limits.model_dump(include=set(LIMIT_NAMES), exclude_none=True)
    return dataclasses.replace(spec, **given)


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(default="", max_length=200)
    expires_in_seconds: PositiveFloat | None = None


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(default="", max_length=200)
    grace_seconds: NonNegativeFloat = 3600.0


class HistoryReplay(BaseModel):
    """``since``: Unix seconds, or an ISO 8601 time with its zone."""

    model_config = ConfigDict(extra="forbid")

    since: float | AwareDatetime
    group: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    limit: int = Field(default=10000, ge=1, le=100_000)

    def since_seconds(self) -> float:
        return self.since if isinstance(self.since, float) else self.since.timestamp()


class Selection(BaseModel):
    """Which dead letters: ``ids`` (message ids), or all of them."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] | None = None
    all: bool = False
