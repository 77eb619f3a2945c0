"""A stand-in for Google Pub/Sub's REST API v1 and Google's OAuth token endpoint.

No Pub/Sub emulator can be installed from the package registries (it ships with the gcloud
SDK), so the ``gcp_pubsub`` tests run against this server instead. It keeps the real API's
paths, JSON shapes, limits and error answers for what the module uses:

- ``PUT  /v1/projects/{p}/topics/{t}`` (optional ``schemaSettings``; encoding JSON means the
  data must be a JSON object, the JSON encoding of an Avro record) and ``PUT .../subscriptions/{s}``
- ``POST .../topics/{t}:publish``: 404 for an unknown topic; 400 for 0 or >1000 messages, data
  that is not base64, a message with neither data nor attributes, >100 attributes, keys over
  256 bytes or starting with ``goog``, values over 1024 bytes, ordering keys over 1024 bytes,
  a request over 10 MiB decoded; answers ``{"messageIds": [...]}``.
- ``POST .../subscriptions/{s}:pull``: what was published after the subscription was made.
- ``POST /token``: the JWT-bearer grant; checks the RS256 signature against ``--public-key``,
  ``aud``, ``iss``, ``kid``, the Pub/Sub scope and a lifetime of at most an hour.

A request with ``Authorization`` must carry a live token from ``/token`` (401 otherwise); one
without is accepted, as the emulator does. State is in memory: a restart forgets everything.
Test hooks, not in the real API: ``GET /_stats`` (successful publish calls by
``anonymous``/``token`` callers, messages published, tokens issued) and ``POST /_control``
(``token_lifetime``, ``revoke_tokens``).

Run: ``python -m tests.modules.pubsub_standin --port P --public-key K --client-email E``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import json
import secrets
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPE = "https://www.googleapis.com/auth/pubsub"
MAX_REQUEST = 10 * 1024 * 1024


def error(code: int, status: str, message: str) -> JSONResponse:
    """Google's error body."""
    return JSONResponse({"error": {"code": code, "message": message, "status": status}}, code)


def bad(message: str) -> JSONResponse:
    return error(400, "INVALID_ARGUMENT", message)


def b64decode(text: str) -> bytes:
    """proto3 JSON bytes: standard or URL-safe base64, padded or not."""
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


class PubSub:
    def __init__(self, public_key: str, client_email: str, key_id: str) -> None:
        self.public_key, self.client_email, self.key_id = public_key, client_email, key_id
        self.topics: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, list[dict[str, Any]]] = {}
        self.subscribed: dict[str, str] = {}  # subscription -> topic
        self.tokens: dict[str, float] = {}  # token -> expiry
        self.token_lifetime = 3599
        self.ids = itertools.count(1)
        self.stats: Counter[str] = Counter()

    def caller(self, request: Request) -> str | None:
        """ "anonymous", "token", or None for a token that is unknown or expired."""
        header = request.headers.get("authorization")
        if header is None:
            return "anonymous"
        token = header.removeprefix("Bearer ")
        return "token" if self.tokens.get(token, 0) > time.time() else None

    async def resource(self, request: Request) -> Response:
        project, kind, name = (request.path_params[k] for k in ("project", "kind", "name"))
        if kind not in ("topics", "subscriptions"):
            return error(404, "NOT_FOUND", "Unknown collection")
        caller = self.caller(request)
        if caller is None:
            return error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        path = f"projects/{project}/{kind}/{name}"
        if request.method == "PUT" and kind == "topics":
            if path in self.topics:
                return error(409, "ALREADY_EXISTS", "Resource already exists in the project")
            self.topics[path] = {"name": path, **(await request.json() or {})}
            return JSONResponse(self.topics[path])
        if request.method == "PUT":
            topic = (await request.json())["topic"]
            if topic not in self.topics:
                return error(404, "NOT_FOUND", "Resource not found (resource=topic).")
            self.subscriptions[path], self.subscribed[path] = [], topic
            return JSONResponse({"name": path, "topic": topic})
        name, _, verb = name.partition(":")
        path = f"projects/{project}/{kind}/{name}"
        if kind == "topics" and verb == "publish":
            answer = self.publish(path, await request.body())
            if answer.status_code == 200:
                self.stats[f"{caller}_publishes"] += 1
            return answer
        if kind == "subscriptions" and verb == "pull":
            if path not in self.subscriptions:
                return error(404, "NOT_FOUND", f"Resource not found (resource={name}).")
            wanted = int((await request.json()).get("maxMessages", 100))
            queue = self.subscriptions[path]
            taken, self.subscriptions[path] = queue[:wanted], queue[wanted:]
            if not taken:
                return JSONResponse({})
            received = [{"ackId": secrets.token_hex(8), "message": m} for m in taken]
            return JSONResponse({"receivedMessages": received})
        return error(404, "NOT_FOUND", "Unknown method")

    def publish(self, topic: str, raw: bytes) -> Response:
        if topic not in self.topics:
            return error(404, "NOT_FOUND", f"Resource not found (resource={topic.split('/')[-1]}).")
        messages = json.loads(raw).get("messages", [])
        if not 1 <= len(messages) <= 1000:
            return bad(f"The value for message_count is out of range: {len(messages)}")
        size = 0
        schema = self.topics[topic].get("schemaSettings") or {}
        for index, message in enumerate(messages):
            problem, message_size = check_message(index, message, schema.get("encoding"))
            if problem:
                return bad(problem)
            size += message_size
        if size > MAX_REQUEST:
            return bad(f"Request payload size exceeds the limit: {MAX_REQUEST} bytes.")
        ids = []
        for message in messages:
            message_id = str(next(self.ids))
            stored = {**message, "messageId": message_id, "publishTime": _now_rfc3339()}
            for subscription, subscribed_topic in self.subscribed.items():
                if subscribed_topic == topic:
                    self.subscriptions[subscription].append(stored)
            ids.append(message_id)
        self.stats["published"] += len(ids)
        return JSONResponse({"messageIds": ids})

    async def token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if form.get("grant_type") != JWT_BEARER:
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        assertion = form.get("assertion", "")
        try:
            if jwt.get_unverified_header(assertion).get("kid") != self.key_id:
                raise jwt.InvalidTokenError("unknown key id")
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=str(request.url),
                issuer=self.client_email,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            return JSONResponse({"error": "invalid_grant", "error_description": str(exc)}, 400)
        if (
            SCOPE not in str(claims.get("scope", "")).split()
            or claims["exp"] - claims["iat"] > 3600
        ):
            return JSONResponse({"error": "invalid_scope"}, 400)
        token = secrets.token_urlsafe(24)
        self.tokens[token] = time.time() + self.token_lifetime
        self.stats["tokens_issued"] += 1
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        return JSONResponse(body)

    async def stats_view(self, request: Request) -> Response:
        return JSONResponse(dict(self.stats))

    async def control(self, request: Request) -> Response:
        settings = await request.json()
        self.token_lifetime = int(settings.get("token_lifetime", self.token_lifetime))
        if settings.get("revoke_tokens"):
            self.tokens.clear()
        return JSONResponse({})


def check_message(index: int, message: dict[str, Any], encoding: str | None) -> tuple[str, int]:
    """What the real API would refuse in one message ("" if nothing), and its decoded size."""
    try:
        data = b64decode(message.get("data", ""))
    except (binascii.Error, ValueError):
        return f"Invalid value at 'messages[{index}].data' (TYPE_BYTES), Base64 decoding failed", 0
    attributes: dict[str, str] = message.get("attributes", {})
    if not data and not attributes:
        return "One or more messages in the publish request is empty.", 0
    if len(attributes) > 100:
        return "Too many attributes: the maximum is 100.", 0
    for key, value in attributes.items():
        if not key or len(key.encode()) > 256 or key.startswith("goog"):
            return f"Invalid attribute key: {key[:40]!r}", 0
        if len(value.encode()) > 1024:
            return f"Attribute value for {key!r} exceeds 1024 bytes", 0
    ordering = message.get("orderingKey", "").encode()
    if len(ordering) > 1024:
        return "The ordering key exceeds 1024 bytes.", 0
    if encoding == "JSON" and not _is_json_object(data):
        return "Invalid data in message: Message failed schema validation.", 0
    size = len(data) + len(ordering)
    return "", size + sum(len(k.encode()) + len(v.encode()) for k, v in attributes.items())


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except ValueError:
        return False


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def app(pubsub: PubSub) -> Starlette:
    path = "/v1/projects/{project}/{kind:str}/{name:str}"
    return Starlette(
        routes=[
            Route(path, pubsub.resource, methods=["PUT", "POST"]),
            Route("/token", pubsub.token, methods=["POST"]),
            Route("/_stats", pubsub.stats_view),
            Route("/_control", pubsub.control, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--client-email", required=True)
    parser.add_argument("--key-id", required=True)
    args = parser.parse_args()
    with open(args.public_key) as key:
        pubsub = PubSub(key.read(), args.client_email, args.key_id)
    uvicorn.run(app(pubsub), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
