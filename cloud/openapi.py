"""``/openapi.json`` and ``/docs``: every configured webhook, its authentication and its body.

Built from the running configuration on each request, so a reload shows at once. Nothing secret
is listed: header and parameter names, never a key, token or password.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
        "operationId": f"webhook_{guard.webhook.webhook_id}",
        "summary": _summary(guard),
        "description": "; ".join(notes),
        "requestBody": {"required": entry.data_type == "json", "content": content},
        "responses": {
            "202": {
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
            },
            **{status: {"description": text} for status, text in ERRORS.items()},
        },
        "x-authentication": list(guard.schemes),
    }
    if scheme_names:
        # One requirement object: every method configured on the webhook must pass.
        operation["security"] = [{name: [] for name in scheme_names}]
    return operation


def openapi_document(guards: Mapping[str, Guard]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the ingest endpoints as configured now."""
    paths: dict[str, Any] = {}
    components: dict[str, Any] = {}
    for webhook_id, guard in sorted(guards.items()):
        schemes = security_schemes(guard)
        components.update(schemes)
        operation = _operation(guard, list(schemes))
        paths[f"/webhook/{webhook_id}"] = {
            method.lower(): operation for method in guard.entry.methods
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Webhook Connect ingest", "version": "1"},
        "paths": paths,
        "components": {"securitySchemes": components},
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Webhook Connect: webhooks</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem}
code,pre{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px}
section{border:1px solid #ddd;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
.m{font-weight:bold;color:#064}
</style></head><body>
<h1>Webhook Connect: webhooks</h1>
<p>Machine-readable: <a href="openapi.json">openapi.json</a></p>
<div id="webhooks">Loading…</div>
<script>
function el(tag, text){const e=document.createElement(tag); if(text) e.textContent=text; return e}
fetch("openapi.json").then(r => r.json()).then(spec => {
  const root = document.getElementById("webhooks"); root.textContent = "";
  const schemes = spec.components.securitySchemes;
  for (const [path, ops] of Object.entries(spec.paths)) {
    const s = el("section"); const h = el("h2");
    h.append(el("span", Object.keys(ops).map(m => m.toUpperCase()).join(" ")), " ",
             el("code", path));
    h.firstChild.className = "m"; s.append(h);
    const op = Object.values(ops)[0];
    s.append(el("p", op.summary + ". " + op.description));
    const auth = (op.security || [{}])[0];
    const names = Object.keys(auth);
    const p = el("p", names.length ? "Authentication (all must pass): " : "No authentication.");
    const ul = el("ul");
    for (const n of names) {
      const d = schemes[n];
      ul.append(el("li", n.split(".").slice(1).join(".") + ": " + d.type +
        (d.scheme ? " " + d.scheme : "") + (d.name ? " (" + d.in + " " + d.name + ")" : "") +
        (d.description ? " — " + d.description : "")));
    }
    s.append(p, ul);
    const body = op.requestBody.content;
    const type = Object.keys(body)[0];
    s.append(el("p", "Body: " + type));
    if (body[type].schema && Object.keys(body[type].schema).length)
      s.append(el("pre", JSON.stringify(body[type].schema, null, 2)));
    root.append(s);
  }
});
</script></body></html>
"""
