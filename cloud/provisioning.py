"""Bring the backend in line with ``webhooks.json`` at start-up: channels, limits, tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from webhook_connect.cloud.buffers import Buffer, ChannelSpec, TokenRecord
from webhook_connect.cloud.config import CloudConfig
from webhook_connect.cloud.tokens import CONFIG_LABEL_PREFIX, hash_token
from webhook_connect.shared.config import Webhook

PROVISION_CONCURRENCY = 16


async def provision(buffer: Buffer, config: CloudConfig) -> None:
    """Create or update every configured channel and register its configured tokens.

    Tokens that an earlier ``webhooks.json`` registered and this one no longer has are removed;
    tokens issued through the admin API are left alone.
    """
    # Channels side by side: a backend that makes a new channel wait (RabbitMQ's new queues,
    # 2 s) then makes them all wait once, not once each.
    gate = asyncio.Semaphore(PROVISION_CONCURRENCY)

    async def provision_one(spec: ChannelSpec) -> None:
        async with gate:
            await buffer.provision(spec)

    # Every call ends before a failure is raised: none is left running behind it.
    specs = config.channels().values()
    results = await asyncio.gather(*map(provision_one, specs), return_exceptions=True)
    if failed := next((r for r in results if isinstance(r, BaseException)), None):
        raise failed
    wanted = _config_tokens(config.webhooks)
    for channel in config.channels():
        for record in await buffer.list_tokens(channel):
            stale = record.label.startswith(CONFIG_LABEL_PREFIX) and (
                record.token_hash not in wanted
            )
            if stale:
                await buffer.delete_token(channel, record.token_id)
    for record in wanted.values():
        await buffer.put_token(record)


def _config_tokens(webhooks: Mapping[str, Webhook]) -> dict[str, TokenRecord]:
    now = time.time()
    records: dict[str, TokenRecord] = {}
    for webhook in webhooks.values():
        if webhook.is_direct:  # delivered by the cloud itself: no connector, no token
            continue
        token_hash = hash_token(webhook.relay.channel_token)
        records[token_hash] = TokenRecord(
            token_id=f"cfg-{token_hash[:12]}",
            channel=webhook.relay.channel,
            token_hash=token_hash,
            label=CONFIG_LABEL_PREFIX + webhook.webhook_id,
            created_at=now,
        )
    return records
