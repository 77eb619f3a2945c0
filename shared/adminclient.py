"""A small synchronous client of the admin API (docs/ADMIN.md) for the command-line tools.

One request per call and no retries: a person or a script is waiting, and a failure is reported
to them as it happened (``CloudUnreachable`` or ``AdminApiError``), never hidden.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from webhook_connect.shared.exceptions import AdminApiError, CloudUnreachable

DEFAULT_TIMEOUT = 30.0
USER_AGENT = "webhook-connect-admin"


def admin_path(*segments: str) -> str:
    """``admin_path("channels", "a b")`` → ``/admin/channels/a%20b``.

    Each segment is quoted whole, so an id holding a ``/`` or ``?`` cannot reach another route.
    """
    return "/admin/" + "/".join(quote(segment, safe="") for segment in segments)


class AdminClient:
    """Calls ``/admin/...`` on one cloud with the admin token."""

    def __init__(self, cloud_url: str, admin_token: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.cloud_url = cloud_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {admin_token}", "User-Agent": USER_AGENT}
        self._timeout = timeout

    def request(
        self,
        method: str,
        *segments: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send one request to ``/admin/<segments>``; return the JSON object of a 2xx answer."""
        try:
            response = httpx.request(
                method,
                self.cloud_url + admin_path(*segments),
                json=body,
                params=params,
                headers=self._headers,
                timeout=self._timeout,
            )
        except (httpx.RequestError, httpx.InvalidURL) as exc:
            raise CloudUnreachable(self.cloud_url, str(exc) or type(exc).__name__) from exc
        return answer_of(response)


def answer_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer; an ``AdminApiError`` for anything else."""
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.is_success and isinstance(answer, dict):
        return answer
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        raise AdminApiError(
            response.status_code,
            answer["error"],
            answer.get("detail"),
            response.headers.get("retry-after"),
        )
    # Not the admin API talking: a proxy's error page, or not a Webhook Connect cloud at all.
    reason = response.reason_phrase.lower().replace(" ", "_") or "error"
    text = " ".join(response.text.split())[:200]
    if response.is_success:
        reason, text = "unexpected_answer", f"not a JSON object: {text or '(empty)'}"
    raise AdminApiError(response.status_code, reason, text or None)
