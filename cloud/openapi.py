"""``/openapi.json`` and ``/docs``: ingest, the connector API and the admin API.

With the admin token the document lists every configured webhook, its authentication and its
body; for anyone else (``--public-docs``) one generic ingest route stands for them. Built from
the running configuration on each request, so a reload shows at once. Nothing secret is ever
listed: header and parameter names, never a key, token or password.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

from webhook_connect.cloud import apispec
from webhook_connect.cloud.pages import build_page
from webhook_connect.cloud.security.guard import Guard

OPENAPI_VERSION = "3.1.0"

ERRORS = {
    "400": "invalid JSON, or JSON over the depth or string-length limits",
    "401": "authentication failed",
    "403": "sender address not allowed",
    "404": "unknown webhook",
    "405": "method not allowed",
    "413": "body over the size limit",
    "422": "body does not match the JSON Schema",
    "429": "rate limit reached; see Retry-After",
    "431": "too many or too large headers",
    "503": "channel full or storage unavailable; see Retry-After",
}
ACCEPTED = {
    "description": "stored durably (a retried delivery: the original message id)",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "status": {"const": "accepted"},
                    "message_id": {"type": "string"},
                    "duplicate": {"type": "boolean"},
                },
            }
        }
    },
}
PROVIDER_HEADERS = {
    "github": "X-Hub-Signature-256",
    "stripe": "Stripe-Signature",
    "slack": "X-Slack-Signature",
    "shopify": "X-Shopify-Hmac-Sha256",
    "standard_webhooks": "webhook-signature",
}


def security_schemes(guard: Guard) -> dict[str, dict[str, Any]]:
    """The OpenAPI security schemes of one webhook, keyed by unique names."""
    schemes = {**_http_schemes(guard), **_key_schemes(guard)}
    return {f"{guard.webhook.webhook_id}.{name}": scheme for name, scheme in schemes.items()}


def _http_schemes(guard: Guard) -> dict[str, dict[str, Any]]:
    """Methods that use the Authorization header."""
    entry = guard.entry
    schemes: dict[str, dict[str, Any]] = {}
    if entry.authorization is not None:
        scheme = entry.authorization.split(" ", 1)[0].lower()
        if scheme == "bearer":
            schemes["authorization"] = {"type": "http", "scheme": "bearer"}
        else:
            schemes["authorization"] = {"type": "apiKey", "in": "header", "name": "Authorization"}
    if entry.basic_auth is not None:
        schemes["basic_auth"] = {"type": "http", "scheme": "basic"}
    if entry.digest_auth is not None:
        schemes["digest_auth"] = {"type": "http", "scheme": "digest"}
    if entry.jwt is not None:
        schemes["jwt"] = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    if entry.oauth2 is not None:
        schemes["oauth2"] = {
            "type": "http",
            "scheme": entry.oauth2.token_type.lower(),
            "description": "OAuth 2.0 access token"
            + (" (introspected)" if entry.oauth2.introspection_endpoint else " (JWT)"),
        }
    if entry.oauth1 is not None:
        schemes["oauth1"] = {
            "type": "http",
            "scheme": "oauth",
            "description": f"OAuth 1.0 signature ({entry.oauth1.signature_method})",
        }
    return schemes


def _key_schemes(guard: Guard) -> dict[str, dict[str, Any]]:
    """Methods that use other headers or the query string."""
    entry = guard.entry
    schemes: dict[str, dict[str, Any]] = {}
    if entry.header_auth is not None:
        name = entry.header_auth.header_name
        schemes["header_auth"] = {"type": "apiKey", "in": "header", "name": name}
    if entry.query_auth is not None:
        name = entry.query_auth.parameter_name
        schemes["query_auth"] = {"type": "apiKey", "in": "query", "name": name}
    if entry.provider is not None:
        schemes["provider"] = {
            "type": "apiKey",
            "in": "header",
            "name": PROVIDER_HEADERS[entry.provider],
            "description": f"{entry.provider} signature of the raw body",
        }
    elif entry.hmac is not None:
        schemes["hmac"] = {
            "type": "apiKey",
            "in": "header",
            "name": entry.hmac.header,
            "description": f"HMAC-{entry.hmac.algorithm.upper()} of the raw body "
            f"({entry.hmac.encoding})",
        }
    if entry.recaptcha is not None:
        where = "header" if entry.recaptcha.token_source == "header" else "body field"
        schemes["recaptcha"] = {
            "type": "apiKey",
            "in": "header",
            "name": entry.recaptcha.token_field,
            "description": f"reCAPTCHA {entry.recaptcha.version} token ({where})",
        }
    return schemes


def _summary(guard: Guard) -> str:
    webhook = guard.webhook
    if webhook.plan is None:
        return f"Relay to channel {webhook.relay.channel}"
    modules = ", ".join(step.module for step in webhook.plan.steps)
    return f"Stored, then delivered by the cloud to: {modules}"


def _operation(guard: Guard, scheme_names: list[str]) -> dict[str, Any]:
    entry = guard.entry
    if entry.data_type == "json" or entry.json_schema is not None:
        content = {"application/json": {"schema": entry.json_schema or {}}}
    else:
        content = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    notes = []
    if entry.ip_whitelist is not None:
        notes.append("senders limited to: " + ", ".join(entry.ip_whitelist))
    if entry.rate_limit is not None:
        limit = entry.rate_limit
        notes.append(f"at most {limit.max_requests} requests per {limit.window_seconds:g} s")
    notes.append(f"bodies up to {entry.max_body_size} bytes")
    operation: dict[str, Any] = {
        "tags": ["ingest"],
        "operationId": f"webhook_{guard.webhook.webhook_id}",
        "summary": _summary(guard),
        "description": "; ".join(notes),
        "requestBody": {"required": entry.data_type == "json", "content": content},
        "responses": {
            "202": ACCEPTED,
            **{status: {"description": text} for status, text in ERRORS.items()},
        },
        "x-authentication": list(guard.schemes),
    }
    if scheme_names:
        # One requirement object: every method configured on the webhook must pass.
        operation["security"] = [{name: [] for name in scheme_names}]
    return operation


def generic_ingest() -> dict[str, Any]:
    """``/webhook/{webhook_id}`` as anyone may see it: no id, no word on who checks what."""
    operation: dict[str, Any] = {
        "tags": ["ingest"],
        "operationId": "webhook",
        "summary": "Deliver a webhook",
        "description": "Stored durably, then answered 202. Methods, authentication, body "
        "rules and limits are set per webhook in webhooks.json.",
        "parameters": [
            {"name": "webhook_id", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "requestBody": {"content": {"*/*": {"schema": {}}}},
        "responses": {"202": ACCEPTED, **{s: {"description": t} for s, t in ERRORS.items()}},
    }
    return {
        method: {**operation, "operationId": f"webhook_{method}"}
        for method in ("post", "put", "patch")
    }


def openapi_document(guards: Mapping[str, Guard], *, detailed: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the cloud: ingest, the connector API, the admin API.

    ``detailed`` (the admin token asked) lists every configured webhook with its methods,
    authentication schemes and body schema; otherwise one generic ingest route stands for them,
    so strangers learn neither the webhook ids nor which of them have no authentication.
    """
    paths: dict[str, Any] = {}
    schemes: dict[str, Any] = dict(apispec.SECURITY_SCHEMES)
    if detailed:
        for webhook_id, guard in sorted(guards.items()):
            own = security_schemes(guard)
            schemes.update(own)
            operation = _operation(guard, list(own))
            paths[f"/webhook/{webhook_id}"] = {
                method.lower(): {**operation, "operationId": f"webhook_{webhook_id}_{method}"}
                for method in guard.entry.methods
            }
    else:
        paths["/webhook/{webhook_id}"] = generic_ingest()
    paths.update(apispec.connector_paths())
    paths.update(apispec.admin_paths())
    paths.update(apispec.operation_paths())
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Webhook Connect",
            "version": package_version(),
            "description": "Ingest (webhook providers), the connector API (docs/PROTOCOL.md) "
            "and the admin API (docs/ADMIN.md).",
        },
        "tags": [
            {"name": "ingest", "description": "What webhook providers call."},
            {
                "name": apispec.CONNECTOR,
                "description": "What connectors call, with a channel token.",
            },
            {"name": apispec.ADMIN, "description": "Administration, with the admin token."},
            {"name": apispec.OPERATIONS, "description": "Health, readiness, metrics, pages."},
        ],
        "paths": paths,
        "components": {"securitySchemes": schemes, "schemas": apispec.component_schemas()},
    }


def package_version() -> str:
    """The installed distribution's version; ``unknown`` when run from a bare source tree."""
    try:
        return importlib.metadata.version("webhook-connect")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# cloud/static/docs.{html,css,js}, read once when the cloud starts.
DOCS_PAGE = build_page("Webhook Connect: API", "docs")
