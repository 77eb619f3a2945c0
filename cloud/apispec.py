"""The OpenAPI description of the cloud's fixed routes: the admin API (docs/ADMIN.md), the
connector API (docs/PROTOCOL.md) and the operational endpoints.

Request bodies are the JSON Schemas of the pydantic models the handlers validate with, so the
document cannot drift from what is accepted; answers are written out here. Pure data: the
ingest part, which depends on the running configuration, is in ``cloud/openapi.py``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from webhook_connect.cloud.admin.common import (
    ChannelLimits,
    HistoryReplay,
    NewChannel,
    NewToken,
    Rotation,
    Selection,
)
from webhook_connect.cloud.admin.groups import NewGroup
from webhook_connect.cloud.pullroutes import AckRequest

Spec = dict[str, Any]

ADMIN = "admin"
CONNECTOR = "connector"
OPERATIONS = "operations"
ADMIN_SECURITY: list[Spec] = [{"adminToken": []}]
# Either form opens a channel: the header, or ?token= for clients that cannot set headers.
CONNECTOR_SECURITY: list[Spec] = [{"channelToken": []}, {"channelTokenQuery": []}]

SECURITY_SCHEMES: Spec = {
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The cloud's --admin-token (WEBHOOK_CONNECT_ADMIN_TOKEN).",
    },
    "channelToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "A connector token of the channel (channel_token, or one the admin API "
        "issued).",
    },
    "channelTokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
}


def ref(name: str) -> Spec:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: Spec, required: list[str] | None = None) -> Spec:
    """A JSON object schema."""
    schema: Spec = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def array(items: Spec) -> Spec:
    return {"type": "array", "items": items}


NUMBER: Spec = {"type": "number"}
INTEGER: Spec = {"type": "integer"}
STRING: Spec = {"type": "string"}
TIME: Spec = {"type": "number", "description": "Unix seconds"}
MAYBE_TIME: Spec = {"type": ["number", "null"], "description": "Unix seconds; null: never"}

RESPONSE_SCHEMAS: Spec = {
    "Error": obj({"error": STRING, "detail": {}}, ["error"]),
    "Channel": obj(
        {
            "name": STRING,
            # Every limit is set on a channel; its type is what the admin API takes.
            **ChannelLimits.model_json_schema()["properties"],
            "depth": INTEGER,
            "in_flight": INTEGER,
            "dead_letters": INTEGER,
            "connections": INTEGER,
            "webhook_urls": {
                "type": "object",
                "additionalProperties": {"type": "string", "format": "uri"},
                "description": "webhook id -> ingest URL of each webhook of webhooks.json that "
                "feeds the channel (--public-url based, else the address of this request)",
            },
        },
        ["name", "depth", "in_flight", "dead_letters", "connections", "webhook_urls"],
    ),
    "ChannelStats": obj(
        {
            "depth": INTEGER,
            "in_flight": INTEGER,
            "dead_letters": INTEGER,
            "oldest_age_seconds": {"type": ["number", "null"]},
            "counters": {"type": "object", "additionalProperties": INTEGER},
        }
    ),
    "Token": obj(
        {"token_id": STRING, "label": STRING, "created_at": TIME, "expires_at": MAYBE_TIME},
        ["token_id", "label", "created_at", "expires_at"],
    ),
    "IssuedToken": {
        "allOf": [
            ref("Token"),
            obj(
                {"token": {"type": "string", "description": "shown only in this answer"}},
                ["token"],
            ),
        ]
    },
    "Connection": obj(
        {
            "connection_id": STRING,
            "connector_id": STRING,
            "group": STRING,
            "transport": {"enum": ["websocket", "sse", "long_poll", "smee"]},
            "address": STRING,
            "connected_at": TIME,
            "seen_at": TIME,
            "token_id": {"type": ["string", "null"]},
            "in_flight": INTEGER,
            "delivered": INTEGER,
        }
    ),
    "Event": obj(
        {
            "time": TIME,
            "type": {"enum": ["received", "delivered", "dead_lettered"]},
            "message_id": STRING,
            "consumer": STRING,
        }
    ),
    "Group": obj(
        {
            "name": STRING,
            "backlog": {"type": "integer", "description": "messages the group has not acked"},
            "in_flight": INTEGER,
            "oldest_age_seconds": {"type": ["number", "null"]},
            "connections": INTEGER,
            "last_seen": TIME,
            "expires_at": {
                "type": ["number", "null"],
                "description": "when it is dropped if no connection comes; null: never",
            },
        }
    ),
    "DeliveryAttempt": obj(
        {
            "attempt": INTEGER,
            "time": TIME,
            "connector_id": STRING,
            "connection_id": STRING,
            "outcome": STRING,
            "status_code": {"type": ["integer", "null"]},
            "duration_seconds": NUMBER,
        }
    ),
    "DeadLetter": obj(
        {
            "dead_letter_id": STRING,
            "message_id": STRING,
            "group": STRING,
            "reason": STRING,
            "attempts": INTEGER,
            "dead_at": TIME,
            "webhook_id": STRING,
            "received_at": TIME,
            "method": STRING,
            "size": INTEGER,
            "delivery_attempts": array(ref("DeliveryAttempt")),
        }
    ),
    "DeadLetterDetail": {
        "allOf": [
            ref("DeadLetter"),
            obj(
                {
                    "path": STRING,
                    "query_string": STRING,
                    "headers": array(array(STRING)),
                    "body_base64": {"type": "string", "contentEncoding": "base64"},
                }
            ),
        ]
    },
    "PollAnswer": obj(
        {
            "messages": array({"type": "object"}),
            "connection_id": STRING,
            "channel": STRING,
            "count": INTEGER,
        }
    ),
    "AckAnswer": obj(
        {
            "status": {"enum": ["acknowledged", "nacked", "ok"]},
            "settled": INTEGER,
            "unknown": array(STRING),
        },
        ["status"],
    ),
}
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ChannelLimits,
    NewChannel,
    NewToken,
    Rotation,
    HistoryReplay,
    Selection,
    AckRequest,
    NewGroup,
)


def component_schemas() -> Spec:
    """Every named schema: the request models' own JSON Schemas and the answers above."""
    schemas = {model.__name__: model.model_json_schema() for model in REQUEST_MODELS}
    return {**schemas, **RESPONSE_SCHEMAS}


def json_answer(description: str, schema: Spec, headers: Spec | None = None) -> Spec:
    answer: Spec = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def error(description: str) -> Spec:
    return json_answer(description, ref("Error"))


RETRY_AFTER = {"Retry-After": {"schema": INTEGER, "description": "seconds"}}
STORAGE_DOWN = json_answer("storage unavailable", ref("Error"), RETRY_AFTER)


def path_param(name: str, description: str) -> Spec:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": STRING,
        "description": description,
    }


def query_param(name: str, schema: Spec, description: str) -> Spec:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def header_param(name: str, description: str) -> Spec:
    return {"name": name, "in": "header", "schema": STRING, "description": description}


CHANNEL = path_param("channel", "channel name: 1-128 of A-Z a-z 0-9 . _ -")
LIMIT = query_param("limit", {"type": "integer", "minimum": 1}, "how many at most")
GROUP = query_param(
    "group",
    {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", "default": "default"},
    "consumer group: connectors of one group share the messages, each group gets every one",
)
CONNECTOR_ID = header_param("X-Connector-ID", "a name for logs and the admin API")
CONNECTOR_ID_QUERY = query_param("connector_id", STRING, "as X-Connector-ID")
WINDOW = query_param(
    "max_in_flight", {"type": "integer", "minimum": 1}, "narrow the channel's in-flight window"
)
NATIVE = header_param(
    "X-Webhook-Connect-Protocol", "webhook-connect.v1 selects the native dialect (exact bytes)"
)
CONNECTION_ID = header_param("X-Connection-ID", "the connection id of the first poll or stream")
CONNECTION_ID_QUERY = query_param("connection_id", STRING, "as X-Connection-ID")
LAST_EVENT_ID = header_param("Last-Event-ID", "resume a stream")
EVENT_STREAM = {"text/event-stream": {"schema": STRING}}


def operation(
    tag: str,
    summary: str,
    responses: Spec,
    *,
    parameters: list[Spec] | None = None,
    body: Spec | None = None,
    security: list[Spec] | None = None,
    description: str | None = None,
) -> Spec:
    """One OpenAPI operation; every admin route also answers 401, 404 and 503."""
    op: Spec = {"tags": [tag], "summary": summary, "responses": dict(responses)}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    if tag == ADMIN:
        op["security"] = ADMIN_SECURITY
        op["responses"].setdefault("401", error("no or wrong admin token"))
        op["responses"].setdefault(
            "404", error("admin_disabled (no --admin-token) or unknown_channel")
        )
        op["responses"].setdefault("503", STORAGE_DOWN)
    elif security is not None:
        op["security"] = security
    return op


def admin_paths() -> Spec:
    """``/admin/...``: channels, tokens, connections, dead letters, reload (docs/ADMIN.md)."""
    channels, one = "/admin/channels", "/admin/channels/{channel}"
    invalid = {"422": error("invalid: a field is wrong; detail names it")}
    deleted = obj({"deleted": STRING, "disconnected": INTEGER})
    return {
        "/admin/reload": {
            "post": operation(
                ADMIN,
                "Load webhooks.json again now",
                {
                    "200": json_answer(
                        "reloaded",
                        obj({"status": {"const": "reloaded"}, "webhooks": array(STRING)}),
                    ),
                    "422": error("invalid_config: <file>: <key>: <reason>"),
                },
            )
        },
        channels: {
            "get": operation(
                ADMIN,
                "List channels",
                {"200": json_answer("sorted by name", obj({"channels": array(ref("Channel"))}))},
            ),
            "post": operation(
                ADMIN,
                "Create a channel and its first connector token",
                {
                    "201": json_answer(
                        "created; the token is shown only here",
                        obj({"channel": ref("Channel"), "token": STRING, "token_id": STRING}),
                    ),
                    "409": error("channel_exists"),
                    **invalid,
                },
                body=ref("NewChannel"),
            ),
        },
        one: {
            "parameters": [CHANNEL],
            "get": operation(
                ADMIN,
                "Show a channel: limits, webhook URLs, stats, tokens, connections",
                {
                    "200": json_answer(
                        "the channel",
                        obj(
                            {
                                "channel": ref("Channel"),
                                "stats": ref("ChannelStats"),
                                "tokens": array(ref("Token")),
                                "connections": array(ref("Connection")),
                            }
                        ),
                    )
                },
            ),
            "patch": operation(
                ADMIN,
                "Change limits",
                {"200": json_answer("updated", obj({"channel": ref("Channel")})), **invalid},
                body=ref("ChannelLimits"),
            ),
            "delete": operation(
                ADMIN,
                "Delete a channel with its messages, dead letters and tokens",
                {"200": json_answer("deleted; its connectors disconnected", deleted)},
            ),
        },
        one + "/events": {
            "parameters": [CHANNEL],
            "get": operation(
                ADMIN,
                "Recent activity, newest first",
                {"200": json_answer("events", obj({"events": array(ref("Event"))}))},
                parameters=[LIMIT],
            ),
        },
        one + "/replay": {
            "parameters": [CHANNEL],
            "post": operation(
                ADMIN,
                "Deliver the channel's history since a time again, to one group",
                {
                    "200": json_answer("replayed", obj({"replayed": INTEGER, "group": STRING})),
                    "409": error("no_history: the channel's history_seconds is 0"),
                    **invalid,
                },
                body=ref("HistoryReplay"),
            ),
        },
        one + "/tokens": {
            "parameters": [CHANNEL],
            "get": operation(
                ADMIN,
                "List connector tokens (never the tokens themselves)",
                {"200": json_answer("tokens", obj({"tokens": array(ref("Token"))}))},
            ),
            "post": operation(
                ADMIN,
                "Issue a connector token",
                {"201": json_answer("issued", ref("IssuedToken")), **invalid},
                body=ref("NewToken"),
            ),
        },
        one + "/rotate-token": {
            "parameters": [CHANNEL],
            "post": operation(
                ADMIN,
                "Issue a token and end every other one after the grace period",
                {
                    "201": json_answer(
                        "rotated",
                        {
                            "allOf": [
                                ref("IssuedToken"),
                                obj({"grace_until": TIME, "rotated": array(STRING)}),
                            ]
                        },
                    ),
                    **invalid,
                },
                body=ref("Rotation"),
            ),
        },
        one + "/tokens/{token_id}": {
            "parameters": [CHANNEL, path_param("token_id", "the token's id")],
            "delete": operation(
                ADMIN,
                "Revoke a token; its live connections are closed",
                {"200": json_answer("revoked", obj({"revoked": STRING, "disconnected": INTEGER}))},
            ),
        },
        one + "/groups": {
            "parameters": [CHANNEL],
            "get": operation(
                ADMIN,
                "List consumer groups with their backlog",
                {"200": json_answer("groups", obj({"groups": array(ref("Group"))}))},
            ),
            "post": operation(
                ADMIN,
                "Create a group (it gets the messages from now on)",
                {
                    "201": json_answer("created", obj({"group": ref("Group")})),
                    "409": error("group_exists"),
                    **invalid,
                },
                body=ref("NewGroup"),
            ),
        },
        one + "/groups/{group}": {
            "parameters": [CHANNEL, path_param("group", "the group's name")],
            "delete": operation(
                ADMIN,
                "Drop a group: its backlog is let go, its connections closed",
                {
                    "200": json_answer(
                        "dropped",
                        obj(
                            {
                                "dropped": STRING,
                                "backlog": INTEGER,
                                "disconnected": INTEGER,
                                "recreated": {"type": "boolean"},
                            }
                        ),
                    )
                },
            ),
        },
        one + "/connections": {
            "parameters": [CHANNEL],
            "get": operation(
                ADMIN,
                "List live connections",
                {"200": json_answer("connections", obj({"connections": array(ref("Connection"))}))},
            ),
        },
        one + "/connections/{connection_id}": {
            "parameters": [CHANNEL, path_param("connection_id", "the connection's id")],
            "delete": operation(
                ADMIN,
                "Close a connection; what it held goes back to the channel",
                {"200": json_answer("disconnected", obj({"disconnected": STRING}))},
            ),
        },
        one + "/dead-letters": {
            "parameters": [CHANNEL],
            "get": operation(
                ADMIN,
                "List dead letters, oldest first",
                {
                    "200": json_answer(
                        "dead letters", obj({"dead_letters": array(ref("DeadLetter"))})
                    )
                },
                parameters=[LIMIT],
            ),
            "delete": operation(
                ADMIN,
                'Purge dead letters ({} or {"all": true}: every one)',
                {"200": json_answer("purged", obj({"purged": INTEGER}))},
                body=ref("Selection"),
            ),
        },
        one + "/dead-letters/replay": {
            "parameters": [CHANNEL],
            "post": operation(
                ADMIN,
                "Send dead letters back to the group that gave up on them",
                {"200": json_answer("replayed", obj({"replayed": INTEGER}))},
                body=ref("Selection"),
            ),
        },
        one + "/dead-letters/{message_id}": {
            "parameters": [CHANNEL, path_param("message_id", "the dead letter's message id")],
            "get": operation(
                ADMIN,
                "One dead letter with its headers and body",
                {"200": json_answer("the dead letter", ref("DeadLetterDetail"))},
            ),
        },
    }


def connector_paths() -> Spec:
    """``/connect/...`` and ``/smee/...``: what connectors use (docs/PROTOCOL.md)."""
    unauthorized = {"401": error("bad, expired or revoked token, or unknown channel")}
    opening = [GROUP, CONNECTOR_ID, CONNECTOR_ID_QUERY, WINDOW]
    return {
        "/connect/stream/{channel}": {
            "parameters": [CHANNEL],
            "get": operation(
                CONNECTOR,
                "WebSocket stream of a channel's messages",
                {
                    "101": {"description": "upgraded; the first frame is `connected`"},
                    **unauthorized,
                },
                parameters=[
                    *opening,
                    header_param(
                        "Sec-WebSocket-Protocol", "webhook-connect.v1 selects the native dialect"
                    ),
                ],
                security=CONNECTOR_SECURITY,
                description="Frames and close codes (4001 token, 4002 removed, 4003 "
                "max_connections, 4400 malformed frame, 4408 not reading, 4503 storage): "
                "docs/PROTOCOL.md. Acks travel on the socket.",
            ),
        },
        "/connect/stream/{channel}/sse": {
            "parameters": [CHANNEL],
            "get": operation(
                CONNECTOR,
                "Server-sent events stream of a channel's messages",
                {
                    "200": {
                        "description": "events connected, webhook, heartbeat, error; ack with "
                        "POST /connect/ack",
                        "headers": {"X-Connection-ID": {"schema": STRING}},
                        "content": EVENT_STREAM,
                    },
                    "400": error("bad group or connector id"),
                    **unauthorized,
                    "429": error("the channel has max_connections connections"),
                    "503": STORAGE_DOWN,
                },
                parameters=[*opening, NATIVE, LAST_EVENT_ID],
                security=CONNECTOR_SECURITY,
            ),
        },
        "/connect/stream/{channel}/poll": {
            "parameters": [CHANNEL],
            "get": operation(
                CONNECTOR,
                "Long-poll for a channel's messages",
                {
                    "200": json_answer("messages", ref("PollAnswer")),
                    "204": {
                        "description": "nothing within timeout, or the window is full",
                        "headers": {"X-Connection-ID": {"schema": STRING}},
                    },
                    "400": error("a parameter out of range"),
                    **unauthorized,
                    "404": error("unknown_connection: poll without it to open a new one"),
                    "429": error("the channel has max_connections connections"),
                    "503": STORAGE_DOWN,
                },
                parameters=[
                    query_param(
                        "timeout",
                        {"type": "integer", "minimum": 1, "maximum": 60, "default": 30},
                        "seconds to wait for messages",
                    ),
                    query_param(
                        "max_messages",
                        {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
                        "messages in one answer at most",
                    ),
                    *opening,
                    CONNECTION_ID,
                    CONNECTION_ID_QUERY,
                    NATIVE,
                ],
                security=CONNECTOR_SECURITY,
            ),
        },
        "/connect/ack": {
            "post": operation(
                CONNECTOR,
                "Ack or nack messages received over SSE or long-poll (any replica)",
                {
                    "200": json_answer("settled", ref("AckAnswer")),
                    "400": error("bad_request: malformed JSON or fields"),
                    **unauthorized,
                    "404": error("unknown_connection or unknown_message"),
                    "413": error("body over 256 KiB"),
                    "503": STORAGE_DOWN,
                },
                parameters=[CONNECTION_ID],
                body=ref("AckRequest"),
                security=CONNECTOR_SECURITY,
            ),
        },
        "/smee/{channel}": {
            "parameters": [CHANNEL],
            "get": operation(
                CONNECTOR,
                "Event stream for the stock smee-client (group smee)",
                {
                    "200": {"description": "events ready, ping, message", "content": EVENT_STREAM},
                    **unauthorized,
                },
                parameters=[
                    query_param("group", STRING, "consumer group (default smee)"),
                    LAST_EVENT_ID,
                ],
                security=CONNECTOR_SECURITY,
            ),
        },
    }


def operation_paths() -> Spec:
    """Health, readiness, metrics, these docs and the dashboard."""
    status = obj({"status": STRING, "reason": STRING})
    page = {"text/html": {"schema": STRING}}
    return {
        "/health": {"get": operation(OPERATIONS, "Liveness", {"200": json_answer("up", status)})},
        "/ready": {
            "get": operation(
                OPERATIONS,
                "Readiness: storage reachable and channels provisioned",
                {
                    "200": json_answer("ready", status),
                    "503": json_answer(
                        'not ready: {"status": "unavailable", "reason": "storage"} or '
                        '{"status": "provisioning"}; details in the log, and here with '
                        "the admin token",
                        status,
                        RETRY_AFTER,
                    ),
                },
            )
        },
        "/metrics": {
            "get": operation(
                OPERATIONS,
                "Prometheus metrics",
                {
                    "200": {
                        "description": "text format",
                        "content": {"text/plain": {"schema": STRING}},
                    }
                },
            )
        },
        "/openapi.json": {
            "get": operation(
                OPERATIONS,
                "This document (with the admin token, or --public-docs)",
                {
                    "200": json_answer("OpenAPI 3.1", {"type": "object"}),
                    "404": error("docs_disabled"),
                },
            )
        },
        "/docs": {
            "get": operation(
                OPERATIONS,
                "This document as a page (with the admin token, or --public-docs)",
                {"200": {"description": "page", "content": page}, "404": error("docs_disabled")},
            )
        },
        "/ui": {
            "get": operation(
                OPERATIONS,
                "The operator's dashboard (asks for the admin token)",
                {"200": {"description": "page", "content": page}},
            )
        },
    }
