"""What the AWS modules (S3, SQS) share: connection settings, one client per connection, and
how an AWS error maps to :class:`Transient` or :class:`Permanent`.

botocore's own retries are off: the connector retries with its backoff and the cloud redelivers,
so a deliver that cannot reach the server fails fast instead of sleeping inside botocore.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Literal

import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from webhook_connect.shared.config.loading import config_error_from
from webhook_connect.shared.modules.base import DeliveryError, Permanent, Transient

# Error codes after which the same request may succeed later. Beside throttling and server
# faults, these are problems an operator fixes without touching the message (a missing bucket or
# queue, credentials, permissions), so the message waits instead of going to the dead letters.
TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeTooSkewed",
        "NoSuchBucket",
        "AccessDenied",
        "AccessDeniedException",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "InvalidSecurity",
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "AWS.SimpleQueueService.QueueDeletedRecently",
        "QueueDeletedRecently",
        "KmsThrottled",
        "KmsUnavailable",
        "KmsDisabled",
        "KmsNotFound",
        "KmsAccessDenied",
        "KmsOptInRequired",
        "KMS.ThrottlingException",
        "KMS.KMSInvalidStateException",
    }
)

# What an AWS call raises when it did not get a definite answer, or got an error answer.
AWS_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


class AwsSettings(BaseModel):
    """The keys of an ``s3``, ``aws_sqs`` or ``aws`` connection in ``connections.json``.

    Keys left out fall back to botocore's chain (environment, ``~/.aws``, instance role).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    region: str | None = Field(None, validation_alias=AliasChoices("region", "region_name"))
    endpoint_url: str | None = Field(None, pattern=r"^https?://")
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    # S3 only: "path" for servers that do not serve bucket sub-domains (MinIO, Ceph, moto).
    addressing_style: Literal["auto", "virtual", "path"] | None = None
    # S3-compatible servers that reject botocore's default CRC32 checksums: "when_required".
    request_checksum_calculation: Literal["when_supported", "when_required"] | None = None
    max_pool_connections: int = Field(50, ge=1, le=1000)
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(30.0, gt=0)


def aws_settings(settings: dict[str, Any]) -> AwsSettings:
    """Validate a connection's keys; a bad key stops start-up with its name."""
    try:
        return AwsSettings.model_validate(settings)
    except ValidationError as exc:
        raise config_error_from(exc, "connections.json", "") from None


def pool_key(service: str, settings: AwsSettings) -> str:
    """One client per service and distinct settings; hashed so no secret sits in a key."""
    dump = settings.model_dump_json(round_trip=True)
    secrets = [settings.aws_secret_access_key, settings.aws_session_token]
    dump += "|".join(s.get_secret_value() for s in secrets if s is not None)
    return f"aws:{service}:{hashlib.sha256(dump.encode()).hexdigest()[:32]}"


def client_arguments(settings: AwsSettings) -> dict[str, Any]:
    """Keyword arguments for ``session.create_client(service, ...)``."""
    config = AioConfig(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=settings.max_pool_connections,
        s3={"addressing_style": settings.addressing_style} if settings.addressing_style else None,
        request_checksum_calculation=settings.request_checksum_calculation,
    )
    secret, token = settings.aws_secret_access_key, settings.aws_session_token
    arguments: dict[str, Any] = {
        "region_name": settings.region or "us-east-1",
        "endpoint_url": settings.endpoint_url,
        "aws_access_key_id": settings.aws_access_key_id,
        "aws_secret_access_key": secret.get_secret_value() if secret else None,
        "aws_session_token": token.get_secret_value() if token else None,
        "config": config,
    }
    return arguments


async def close_client(client: Any) -> None:
    """Close a client opened with ``await session.create_client(...).__aenter__()``."""
    await client.__aexit__(None, None, None)


def is_transient(status: int, code: str) -> bool:
    """Whether an AWS error answer (HTTP status, error code) is worth another attempt."""
    return status >= 500 or status in (408, 429) or code in TRANSIENT_CODES


def delivery_error(exc: BaseException, what: str) -> DeliveryError:
    """The :class:`DeliveryError` for an exception from :data:`AWS_ERRORS`."""
    if isinstance(exc, ClientError):
        error: dict[str, Any] = dict(exc.response.get("Error", {}))
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        kind = Transient if is_transient(status, code) else Permanent
        return kind(f"{what}: {code or status}: {error.get('Message', '')}".rstrip(": "))
    if isinstance(exc, ParamValidationError):
        return Permanent(f"{what}: {exc}")
    return Transient(f"{what}: {type(exc).__name__}: {exc}")
