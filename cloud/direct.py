"""Direct delivery: webhooks the cloud hands to output modules itself (``"module": "kafka"``...).

They are stored first, like every webhook, in a channel of their own (``_direct.<webhook_id>``),
so the 202 still means "durable", and every cloud process delivers from there through the
shared module registry: acked once the modules confirmed, retried and dead-lettered by the same
rules as a connector's deliveries, listed by the admin API like any channel's dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Mapping

from webhook_connect.cloud.buffers import Buffer, Delivery
from webhook_connect.shared.config import Webhook
from webhook_connect.shared.config.delivery import DeliveryPlan
from webhook_connect.shared.exceptions import StorageError
from webhook_connect.shared.modules import Message
from webhook_connect.shared.modules.pipeline import Dispatcher

logger = logging.getLogger("webhook_connect.direct")

GROUP = "default"
CONCURRENCY = 32  # messages each process delivers at once, per direct webhook
IDLE_WAIT = 1.0  # also when a retry delay ends: nothing announces that


class DirectDelivery:
    """Runs one delivery loop per direct webhook; ``apply`` swaps in a reloaded configuration."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self._dispatcher: Dispatcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._consumer = f"cloud-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    async def apply(self, webhooks: Mapping[str, Webhook]) -> None:
        """Stop delivering by the old plans, start by these (what was held goes back)."""
        await self.aclose()
        plans: dict[str, DeliveryPlan] = {
            webhook_id: webhook.plan for webhook_id, webhook in webhooks.items() if webhook.plan
        }
        if not plans:
            return
        dispatcher = Dispatcher(plans)
        self._dispatcher = dispatcher
        channels = [webhooks[webhook_id].relay.channel for webhook_id in plans]
        self._tasks = [asyncio.create_task(self._run(dispatcher, channels))]

    async def _run(self, dispatcher: Dispatcher, channels: list[str]) -> None:
        # Setting modules up may wait on their servers: never in the way of readiness.
        await dispatcher.start()
        await asyncio.gather(*(self._serve(channel, dispatcher) for channel in channels))

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._dispatcher is not None:
            await self._dispatcher.aclose()
            self._dispatcher = None

    async def _serve(self, channel: str, dispatcher: Dispatcher) -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                room = CONCURRENCY - len(running)
                if room == 0:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                since = self.buffer.change_version(channel)
                try:
                    deliveries = await self.buffer.read(channel, GROUP, self._consumer, room)
                except StorageError as exc:
                    logger.warning("direct delivery of %r paused: %s", channel, exc)
                    await asyncio.sleep(IDLE_WAIT)
                    continue
                if not deliveries:
                    await self.buffer.wait_for_change(channel, since, IDLE_WAIT)
                    continue
                for delivery in deliveries:
                    task = asyncio.create_task(self._deliver(channel, dispatcher, delivery))
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            with contextlib.suppress(StorageError):
                await self.buffer.release(channel, GROUP, self._consumer)

    async def _deliver(self, channel: str, dispatcher: Dispatcher, delivery: Delivery) -> None:
        message = Message.of(delivery.message_id, delivery.attempt, delivery.envelope)
        verdict = await dispatcher.deliver(message)
        try:
            if verdict.delivered:
                await self.buffer.ack(channel, GROUP, delivery.message_id, self._consumer)
                return
            logger.warning(
                "direct delivery of %s (%s, attempt %d) failed: %s",
                delivery.message_id,
                message.webhook_id,
                delivery.attempt,
                verdict.reason,
            )
            await self.buffer.nack(
                channel,
                GROUP,
                delivery.message_id,
                retry=verdict.retry,
                consumer=self._consumer,
                reason=verdict.reason,
            )
        except StorageError as exc:  # the ack timeout brings it back
            logger.warning("settling %s failed: %s", delivery.message_id, exc)
