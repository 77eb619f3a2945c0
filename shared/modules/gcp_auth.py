"""Google service-account access tokens, without the Google SDK.

The OAuth 2.0 JWT-bearer flow: sign a short-lived JWT with the key file's private key (RS256),
post it to the key file's ``token_uri``, and use the access token it returns until shortly before
it expires. One exchange serves every publish until then; concurrent callers share it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from webhook_connect.shared.modules.base import Transient

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google accepts assertions valid for at most an hour.
ASSERTION_LIFETIME = 3600
# Refresh this long before expiry, so a token never expires in flight (google-auth: 225 s).
REFRESH_MARGIN = 300


class ServiceAccount(BaseModel):
    """The fields of a service-account key file that the token exchange needs."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    client_email: str
    private_key: SecretStr
    private_key_id: str | None = None
    token_uri: str = "https://oauth2.googleapis.com/token"
    project_id: str | None = None


def load_service_account(path: str) -> ServiceAccount:
    """Read a key file; ValueError names the file and what is wrong with it."""
    try:
        account = ServiceAccount.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        reason = f"{where}: {first['msg']}"
        raise ValueError(f"{path} is not a service-account key file: {reason}") from None
    try:
        # Parsed now, so a broken key stops start-up rather than the first delivery.
        load_pem_private_key(account.private_key.get_secret_value().encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: private_key is not a PEM private key ({exc})") from None
    return account


def assertion(account: ServiceAccount, scope: str, now: float) -> str:
    """The signed JWT that asks ``account.token_uri`` for an access token with ``scope``."""
    issued = int(now)
    claims = {
        "iss": account.client_email,
        "scope": scope,
        "aud": account.token_uri,
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME,
    }
    headers = {"kid": account.private_key_id} if account.private_key_id else None
    return jwt.encode(claims, account.private_key.get_secret_value(), "RS256", headers=headers)


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    expires_at: float

    def is_fresh(self, now: float) -> bool:
        """Whether the token may still be sent (it will not expire within the margin)."""
        return now < self.expires_at - REFRESH_MARGIN


class TokenSource:
    """Access tokens for one service account, exchanged once and reused until nearly expired."""

    def __init__(
        self,
        account: ServiceAccount,
        scope: str,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.account = account
        self.scope = scope
        self._client = client
        self._clock = clock
        self._token: AccessToken | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A fresh access token; :class:`Transient` when the exchange fails."""
        async with self._lock:
            if self._token is None or not self._token.is_fresh(self._clock()):
                self._token = await self._exchange()
            return self._token.value

    def invalidate(self, value: str) -> None:
        """Forget ``value`` (the server refused it), unless a newer token replaced it."""
        if self._token is not None and self._token.value == value:
            self._token = None

    async def _exchange(self) -> AccessToken:
        now = self._clock()
        form = {"grant_type": JWT_BEARER, "assertion": assertion(self.account, self.scope, now)}
        uri = self.account.token_uri
        try:
            response = await self._client.post(uri, data=form)
        except httpx.HTTPError as exc:
            raise Transient(f"token exchange at {uri}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            # A revoked key or a wrong clock: the operator fixes it, the message waits.
            raise Transient(
                f"token exchange at {uri}: {response.status_code} {response.text[:200]}"
            )
        try:
            answer = response.json()
            return AccessToken(str(answer["access_token"]), now + float(answer["expires_in"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise Transient(f"token exchange at {uri}: unexpected answer: {exc!r}") from exc
