"""``recaptcha``: a Google reCAPTCHA token, verified with the ``siteverify`` API.

The token comes from a header or from the body (a JSON object or an HTML form). v3 answers
also carry a ``score`` (1.0 very likely a human) and the ``action`` the page declared; both are
held to the configuration. When the verify endpoint cannot answer, the webhook gets 503 with
``Retry-After``, as for token introspection.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from webhook_connect.cloud.security.inbound import Check, InboundRequest, Services, unauthorized
from webhook_connect.cloud.security.outbound import post_form
from webhook_connect.shared.config.inbound import RecaptchaConfig

# Where browsers and client libraries put the token, after the configured field.
BODY_FIELDS = ("recaptcha_token", "recaptcha", "g-recaptcha-response")
FORM_TYPE = "application/x-www-form-urlencoded"
# Google's error codes are a fixed vocabulary; anything else is not repeated to the sender.
ERROR_CODE = re.compile(r"^[a-z][a-z-]{0,63}$")


def token_of(request: InboundRequest, config: RecaptchaConfig) -> str | None:
    """The reCAPTCHA token the request carries where ``config`` says, or None."""
    if config.token_source == "header":
        value = (request.header(config.token_field) or "").strip()
        return value or None
    fields = (config.token_field, *BODY_FIELDS)
    document = request.json()
    if isinstance(document, dict):
        for name in fields:
            field = document.get(name)
            if isinstance(field, str) and field:
                return field
        return None
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type == FORM_TYPE:
        form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"))
        for name in fields:
            values = form.get(name)
            if values and values[0]:
                return values[0]
    return None


def judge(answer: Mapping[str, Any], config: RecaptchaConfig) -> str | None:
    """Why the siteverify ``answer`` fails ``config``, or None when it passes."""
    if answer.get("success") is not True:
        codes = answer.get("error-codes")
        codes = codes if isinstance(codes, list) else []
        shown = [code for code in codes if isinstance(code, str) and ERROR_CODE.match(code)]
        return "reCAPTCHA verification failed" + (f" ({', '.join(shown)})" if shown else "")
    if config.version == "v3":
        score = answer.get("score")
        if isinstance(score, bool) or not isinstance(score, int | float):
            return "reCAPTCHA answer has no score"
        if not math.isfinite(score) or score < config.min_score:
            return "reCAPTCHA score too low"
        if config.expected_action is not None and answer.get("action") != config.expected_action:
            return "reCAPTCHA action does not match"
    return None


def build(config: RecaptchaConfig, services: Services) -> Check:
    """The ``recaptcha`` check."""

    async def check(request: InboundRequest) -> None:
        token = token_of(request, config)
        if token is None:
            raise unauthorized("missing reCAPTCHA token")
        form = {"secret": config.secret_key, "response": token}
        if request.client:
            form["remoteip"] = request.client
        answer = await post_form(
            services.http,
            config.verify_url,
            form,
            timeout_seconds=config.timeout_seconds,
            what="reCAPTCHA verification",
        )
        reason = judge(answer, config)
        if reason is not None:
            raise unauthorized(reason)

    return check
