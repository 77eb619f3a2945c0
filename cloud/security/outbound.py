"""Calls to the verifiers a check depends on (token introspection, reCAPTCHA): when one cannot
answer, the sender is told to retry (503), not that its credentials are wrong (401)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import httpx

from webhook_connect.cloud.security.inbound import Rejected

logger = logging.getLogger(__name__)

RETRY_AFTER = b"5"


def unavailable(detail: str) -> Rejected:
    """503 with ``Retry-After``: the verifier we depend on could not answer."""
    return Rejected(503, "auth_unavailable", detail, [(b"retry-after", RETRY_AFTER)])


async def post_form(
    http: httpx.AsyncClient | None,
    url: str,
    form: Mapping[str, str],
    *,
    timeout_seconds: float,
    headers: Mapping[str, str] | None = None,
    what: str,
) -> dict[str, Any]:
    """POST ``form`` to a verification endpoint and return its JSON object; raise 503 (see
    :func:`unavailable`) when it is unreachable, slow, or answers anything but 200 and JSON."""
    if http is None:
        raise unavailable(f"{what} is not available on this server")
    # The host only: a URL may carry credentials, and logs must not.
    where = httpx.URL(url).host
    try:
        # One deadline for the whole exchange; httpx's own applies to each phase separately.
        async with asyncio.timeout(timeout_seconds):
            answer = await http.post(url, data=dict(form), headers=headers, timeout=timeout_seconds)
    except (httpx.HTTPError, TimeoutError) as exc:
        logger.warning("%s at %s failed: %s", what, where, type(exc).__name__)
        raise unavailable(f"{what} unavailable") from None
    if answer.status_code != 200:
        logger.warning("%s at %s answered %d", what, where, answer.status_code)
        raise unavailable(f"{what} unavailable")
    try:
        document = answer.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        logger.warning("%s at %s did not answer a JSON object", what, where)
        raise unavailable(f"{what} unavailable")
    return document
