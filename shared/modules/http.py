"""``http_webhook``: forward the body, byte for byte, to another HTTP endpoint.

SSRF guard: a destination that resolves to a loopback, private, link-local or otherwise
reserved address (cloud metadata at 169.254.169.254 included) is refused unless its host is
listed in ``allowed_hosts``; when ``allowed_hosts`` is given, no other host is reached at all.
Redirects are not followed, so a public host cannot bounce a request inward. 2xx is success;
408, 425, 429 and 5xx are worth another attempt; other statuses reject the message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import ClassVar, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

from webhook_connect.shared.modules.base import Message, Module, Permanent, Transient
from webhook_connect.shared.policy import HOP_BY_HOP, Outcome, classify_status

RESOLVED_FOR = 30.0  # seconds a host's addresses are trusted before they are checked again


class HttpWebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: PositiveFloat = 30.0
    forward_headers: bool = False
    allowed_headers: tuple[str, ...] | None = None
    allowed_hosts: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> HttpWebhookConfig:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http or https URL with a host, not {self.url!r}")
        if self.allowed_hosts is not None and parts.hostname not in self.allowed_hosts:
            raise ValueError(f"url host {parts.hostname!r} is not in allowed_hosts")
        for name, value in self.headers.items():
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} holds a control character")
        return self


class HttpWebhookModule(Module[HttpWebhookConfig]):
    name = "http_webhook"
    Config: ClassVar[type[BaseModel]] = HttpWebhookConfig

    _checked_until: float = 0.0

    async def deliver(self, message: Message) -> None:
        config = self.config
        await self._guard()
        client = await self.pools.get("http", _open_client, _close_client)
        try:
            answer = await client.request(
                config.method,
                config.url,
                content=message.body,
                headers=self._headers(message),
                timeout=config.timeout,
            )
        except httpx.TimeoutException as exc:
            raise Transient(f"timeout: {exc}") from exc
        except httpx.HTTPError as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from exc
        outcome = classify_status(answer.status_code)
        if outcome is Outcome.RETRY:
            raise Transient(f"http_{answer.status_code}")
        if outcome is Outcome.REJECTED:
            raise Permanent(f"http_{answer.status_code}")

    def _headers(self, message: Message) -> list[tuple[str, str]]:
        config = self.config
        allowed = (
            None if config.allowed_headers is None else {h.lower() for h in config.allowed_headers}
        )
        # A configured header replaces the sender's of the same name (any case), not joins it.
        configured = {name.lower() for name in config.headers}
        out: list[tuple[str, str]] = []
        for name, value in message.headers:
            key = name.lower()
            if key in HOP_BY_HOP or key in configured:
                continue
            # The content type describes the bytes, so it travels even when headers do not.
            wanted = config.forward_headers and (allowed is None or key in allowed)
            if wanted or key == "content-type":
                out.append((name, value))
        out.extend(config.headers.items())
        out.append(("X-Webhook-Connect-Message-Id", message.message_id))
        return out

    async def _guard(self) -> None:
        """Refuse a destination that resolves inward, unless its host is allowed by name."""
        host = urlsplit(self.config.url).hostname or ""
        allowed = self.config.allowed_hosts
        if (allowed is not None and host in allowed) or time.monotonic() < self._checked_until:
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise Transient(f"cannot resolve {host!r}: {exc}") from exc
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global:
                raise Permanent(
                    f"{host!r} resolves to {address}, a non-public address: "
                    "list the host in allowed_hosts to reach it"
                )
        self._checked_until = time.monotonic() + RESOLVED_FOR


async def _open_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(follow_redirects=False, limits=httpx.Limits(max_connections=100))


async def _close_client(client: httpx.AsyncClient) -> None:
    await client.aclose()
