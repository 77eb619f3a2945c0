"""Cloud replicas on one RabbitMQ asking each other through the broker.

A delivery tag belongs to the AMQP channel that received the message, so only the replica
holding a delivery can ack it; and only the replica that stored an ``append_once`` knows the
id it returned. When a replica is asked about what another one holds (an SSE or long-poll ack
that reached it, a provider's retry of a delivery another replica stored), it asks every
replica at once: a request on a fanout exchange, which each replica's exclusive queue
receives; the one that knows answers to the asker's queue. Nobody answering within the
timeout means nobody knows (the message was acked, redelivered, or its replica is gone).

Each replica listens on the channel that holds its deliveries, so it answers exactly as long
as it holds them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

logger = logging.getLogger("webhook_connect.rabbitmq")

ASK = "ask"
ANSWER = "answer"
# How long an asker waits for the replica that knows (several round trips on a loaded host).
ASK_TIMEOUT = 1.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


class Peers:
    """This replica's line to the others: ``ask`` them, and answer them with ``handle``."""

    def __init__(self, exchange: str, handle: Handler) -> None:
        self._exchange_name = exchange
        self._handle = handle
        self._me = uuid.uuid4().hex
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._queue = ""
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    @property
    def listening(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    async def attach(self, channel: AbstractChannel) -> None:
        """Listen (and ask) on ``channel``, the one holding this replica's deliveries."""
        exchange = await channel.declare_exchange(
            self._exchange_name, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        await queue.consume(self._on_message, no_ack=True)
        self._channel, self._exchange, self._queue = channel, exchange, queue.name

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Broadcast ``request``; the first answer, or ``{}`` when nobody answers in time."""
        if self._exchange is None or not self.listening:
            return {}
        correlation = uuid.uuid4().hex
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = answer
        try:
            await self._exchange.publish(
                aio_pika.Message(
                    orjson.dumps(request),
                    type=ASK,
                    app_id=self._me,
                    reply_to=self._queue,
                    correlation_id=correlation,
                ),
                routing_key="",
            )
            return await asyncio.wait_for(answer, ASK_TIMEOUT)
        except TimeoutError:
            return {}
        finally:
            self._waiting.pop(correlation, None)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            if message.type == ANSWER:
                waiting = self._waiting.get(message.correlation_id or "")
                if waiting is not None and not waiting.done():
                    waiting.set_result(orjson.loads(message.body))
                return
            if message.app_id == self._me or not message.reply_to:
                return
            answer = await self._handle(orjson.loads(message.body))
            if answer is not None and self._channel is not None:
                await self._channel.default_exchange.publish(
                    aio_pika.Message(
                        orjson.dumps(answer), type=ANSWER, correlation_id=message.correlation_id
                    ),
                    routing_key=message.reply_to,
                )
        except Exception:  # one bad request must not stop this replica answering the next
            logger.exception("a request from another replica failed")
