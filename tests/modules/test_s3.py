"""The ``s3`` module against moto's standalone S3 server, read back with boto3."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydantic import ValidationError

from tests.modules.cloud_peers import BINARY_BODY, JSON_BODY, MotoServer, make_message
from tests.servers import running
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.exceptions import ConfigError
from webhook_connect.shared.modules.base import Permanent, Pools, Transient
from webhook_connect.shared.modules.registry import module_class
from webhook_connect.shared.modules.s3 import S3Config, S3Module

BUCKET = "webhook-archive"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with running(MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")) as server:
        yield server


@pytest.fixture
def s3(moto: MotoServer) -> Any:
    """An independent client, with a fresh empty bucket."""
    settings = moto.connection()
    client = boto3.client(
        "s3",
        endpoint_url=settings["endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    recreate_bucket(client)
    yield client
    client.close()


def recreate_bucket(client: Any) -> None:
    existing = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    if BUCKET in existing:
        for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    else:
        client.create_bucket(Bucket=BUCKET)


def keys(client: Any) -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


@pytest.fixture
async def make_module(moto: MotoServer) -> AsyncIterator[Callable[..., S3Module]]:
    pools = Pools()
    connection = ConnectionEntry.model_validate({"type": "s3", **moto.connection()})

    def make(**config: Any) -> S3Module:
        return S3Module(S3Config.model_validate({"bucket": BUCKET, **config}), connection, pools)

    yield make
    await pools.aclose()


async def test_binary_body_lands_byte_exact_with_its_metadata(
    s3: Any, make_module: Callable[..., S3Module]
) -> None:
    module = make_module()
    await module.start()
    headers = (("Content-Type", "application/octet-stream"), ("X-Seen", "caf\xe9"))
    await module.deliver(make_message("m-1", BINARY_BODY, headers=headers))

    # The Core Webhook Module's layout: prefix/YYYY/MM/DD/HH/file, dated by receipt.
    stored = s3.get_object(Bucket=BUCKET, Key="webhooks/2026/08/28/14/webhook_m-1")
    assert stored["Body"].read() == BINARY_BODY
    assert stored["ContentType"] == "application/octet-stream"
    metadata = stored["Metadata"]
    assert metadata["message-id"] == "m-1"
    assert metadata["webhook-id"] == "stripe"
    assert metadata["channel"] == "payments"
    assert metadata["received-at"] == "2026-08-28T14:05:33.123456Z"
    assert json.loads(metadata["headers"]) == [list(pair) for pair in headers]


async def test_json_body_under_a_key_pattern(s3: Any, make_module: Callable[..., S3Module]) -> None:
    module = make_module(key_pattern="hooks/{webhook_id}/date={date}/{message_id}.json")
    await module.deliver(make_message("evt-7", JSON_BODY))

    stored = s3.get_object(Bucket=BUCKET, Key="hooks/stripe/date=2026-08-28/evt-7.json")
    assert stored["Body"].read() == JSON_BODY
    assert stored["ContentType"] == "application/json"
    assert json.loads(stored["Metadata"]["headers"])[2:] == [["X-Seen", "one"], ["X-Seen", "two"]]


async def test_configured_content_type_and_no_headers(
    s3: Any, make_module: Callable[..., S3Module]
) -> None:
    module = make_module(prefix="", content_type="text/plain", include_headers=False)
    await module.deliver(make_message("m-2", b"plain"))

    stored = s3.get_object(Bucket=BUCKET, Key="2026/08/28/14/webhook_m-2")
    assert stored["ContentType"] == "text/plain"
    assert "headers" not in stored["Metadata"]


async def test_a_redelivery_overwrites_instead_of_adding_a_copy(
    s3: Any, make_module: Callable[..., S3Module]
) -> None:
    module = make_module()
    await asyncio.gather(*(module.deliver(make_message(f"m-{i}")) for i in range(40)))
    await module.deliver(make_message("m-3"))
    assert len(keys(s3)) == 40


async def test_headers_over_the_metadata_limit_are_left_out_with_a_note(
    s3: Any, make_module: Callable[..., S3Module]
) -> None:
    module = make_module()
    await module.deliver(make_message("big", headers=(("X-Big", "v" * 3000),)))

    stored = s3.get_object(Bucket=BUCKET, Key="webhooks/2026/08/28/14/webhook_big")
    assert stored["Body"].read() == JSON_BODY
    assert "headers" not in stored["Metadata"]
    assert "over the S3 2 KB metadata limit" in stored["Metadata"]["headers-omitted"]


@pytest.mark.parametrize("webhook_id", ["..", "x" * 1100, "a\x01b"])
async def test_a_key_s3_would_refuse_is_permanent(
    s3: Any, make_module: Callable[..., S3Module], webhook_id: str
) -> None:
    module = make_module(key_pattern="{webhook_id}/{message_id}")
    with pytest.raises(Permanent):
        await module.deliver(make_message(webhook_id=webhook_id))
    assert keys(s3) == []


async def test_a_missing_bucket_waits_for_the_operator(
    s3: Any, make_module: Callable[..., S3Module]
) -> None:
    module = S3Module(S3Config(bucket="no-such-bucket"), make_module().connection, Pools())
    try:
        with pytest.raises(Transient, match="NoSuchBucket"):
            await module.deliver(make_message())
    finally:
        await module.pools.aclose()


def test_the_registry_loads_the_module() -> None:
    assert module_class("s3") is S3Module


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"bucket": "Bad_Bucket"}, "bucket"),
        ({"bucket": BUCKET, "filename_pattern": "{sender}.json"}, "unknown placeholder"),
        ({"bucket": BUCKET, "filename_pattern": "{date:%Y}"}, "takes no format"),
        ({"bucket": BUCKET, "filename_pattern": "a/b"}, "file name"),
        ({"bucket": BUCKET, "prefix": "../up"}, "'..' path segment"),
        ({"bucket": BUCKET, "prefix": "a b"}, "characters outside"),
        ({"bucket": BUCKET, "key_pattern": "k", "prefix": "p"}, "give only one"),
        ({"bucket": BUCKET, "region": "eu-west-1"}, "Extra inputs"),
        ({"prefix": "p"}, "bucket"),
    ],
)
def test_a_bad_module_config_is_refused(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        S3Config.model_validate(config)


def test_a_bad_connection_setting_is_refused() -> None:
    connection = ConnectionEntry.model_validate({"type": "s3", "endpoint": "http://x"})
    with pytest.raises(ConfigError, match="endpoint"):
        S3Module(S3Config(bucket=BUCKET), connection, Pools())


async def test_server_down_is_transient_and_a_restart_needs_no_new_module(
    moto: MotoServer, s3: Any, make_module: Callable[..., S3Module], tmp_path: Path
) -> None:
    module = make_module()
    await module.deliver(make_message("before"))
    moto.stop()
    try:
        with pytest.raises(Transient):
            await module.deliver(make_message("during"))
    finally:
        moto.start()
    recreate_bucket(s3)  # moto restarts empty

    await module.deliver(make_message("after", BINARY_BODY))
    stored = s3.get_object(Bucket=BUCKET, Key="webhooks/2026/08/28/14/webhook_after")
    assert stored["Body"].read() == BINARY_BODY
