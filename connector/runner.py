"""The connector's main loop: connect, deliver with bounded concurrency, ack, reconnect.

Per message: skip it if the delivered log already has it (a redelivery), else deliver; on
success the id goes to the delivered log *before* the ack, so a crash between the two cannot
cause a second delivery after restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
from collections.abc import Callable

from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.dedup import DeliveredLog
from webhook_connect.connector.delivery import Deliverer, DeliveryResult
from webhook_connect.connector.metrics import Metrics
from webhook_connect.connector.printer import LinePrinter
from webhook_connect.connector.transports import Disconnected, Refused, Transport
from webhook_connect.shared.frames import WireMessage
from webhook_connect.shared.policy import Backoff, Outcome

logger = logging.getLogger("webhook_connect.connector")

ACK_DELAY = 0.005


class Runner:
    """Runs until ``stop`` is set (exit 0) or the cloud refuses us (exit 1)."""

    def __init__(
        self,
        settings: ConnectorSettings,
        deliverer: Deliverer,
        delivered: DeliveredLog,
        open_transport: Callable[[ConnectorSettings], Transport],
        rng: random.Random | None = None,
        printer: LinePrinter | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._deliverer = deliverer
        self._delivered = delivered
        self._open_transport = open_transport
        self._rng = rng or random.Random()
        self._printer = printer or LinePrinter(sys.stdout)
        self.metrics = metrics or Metrics()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._acks: dict[Transport, list[str]] = {}
        self._ack_tasks: set[asyncio.Future[None]] = set()
        self._backoff = Backoff(
            settings.reconnect_delay_seconds,
            settings.max_reconnect_delay_seconds,
            settings.reconnect_backoff_multiplier,
        )

    async def run(self, stop: asyncio.Event) -> int:
        settings = self._settings
        while not stop.is_set():
            transport = self._open_transport(settings)
            connected = False
            try:
                await transport.connect()
                connected = True
                self.metrics.up()
                logger.info(
                    "connected to %s channel %r group %r as %s (%s)",
                    settings.cloud_url,
                    settings.channel,
                    settings.group,
                    transport.connection_id,
                    settings.protocol,
                )
                self._backoff.reset()
                await self._serve(transport, stop)
            except Refused as exc:
                self.metrics.down()
                logger.error("refused: %s — not retrying; check the token and channel", exc)
                await self._finish(transport)
                return 1
            except Disconnected as exc:
                self.metrics.down()
                self.metrics.reconnects += 1
                delay = self._backoff.next_delay(self._rng)
                # Anything but the cloud's refusal of the token is retried: a proxy's 403,
                # a cloud being deployed, a network gone for a while.
                what = "connection lost" if connected else "cannot connect"
                logger.warning("%s: %s; reconnecting in %.1fs", what, exc, delay)
                await transport.aclose()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            self.metrics.down()
            await self._finish(transport)
        logger.info("stopped")
        return 0

    async def _serve(self, transport: Transport, stop: asyncio.Event) -> None:
        receiving = asyncio.create_task(self._receive(transport))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not receiving.done():
                receiving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiving
        if not stop.is_set():
            receiving.result()  # raises Disconnected or Refused

    async def _receive(self, transport: Transport) -> None:
        async for message in transport.messages():
            await self._slots.acquire()
            task = asyncio.create_task(self._handle(transport, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, transport: Transport, message: WireMessage) -> None:
        metrics = self.metrics
        metrics.in_flight += 1
        try:
            if message.message_id in self._delivered:
                self._ack_soon(transport, message.message_id)
                metrics.duplicate()
                self._log(message, None, "duplicate suppressed (already delivered)")
                return
            try:
                result = await self._deliverer.deliver(message)
                if self._settings.ordered:
                    result = await self._until_settled(message, result)
            except asyncio.CancelledError:
                # Shutting down mid-delivery: hand it back for another attempt.
                await transport.nack(message.message_id, retry=True, reason="connector_stopped")
                raise
            if result.outcome is Outcome.DELIVERED:
                self._delivered.add(message.message_id)
                self._ack_soon(transport, message.message_id)
            else:
                retry = result.outcome is Outcome.RETRY
                await transport.nack(message.message_id, retry=retry, reason=result.reason)
            metrics.delivery(
                result.outcome, result.seconds, result.status, result.error, result.unmatched
            )
            self._log(message, result)
        finally:
            metrics.in_flight -= 1
            self._slots.release()

    async def _until_settled(self, message: WireMessage, result: DeliveryResult) -> DeliveryResult:
        """Ordered mode: a nack would let the next message overtake this one, so keep trying
        here (with backoff) until it is delivered or rejected."""
        backoff = Backoff(
            self._settings.reconnect_delay_seconds, self._settings.max_reconnect_delay_seconds
        )
        while result.outcome is Outcome.RETRY:
            self._log(message, result)
            await asyncio.sleep(backoff.next_delay(self._rng))
            result = await self._deliverer.deliver(message)
        return result

    def _ack_soon(self, transport: Transport, message_id: str) -> None:
        """Acks wait up to ACK_DELAY to travel together: one log write and one frame each."""
        if not self._acks:
            asyncio.get_running_loop().call_later(ACK_DELAY, self._send_acks)
        self._acks.setdefault(transport, []).append(message_id)

    def _send_acks(self) -> None:
        self._delivered.flush()  # on disk before the cloud may forget the messages
        for transport, message_ids in self._acks.items():
            task = asyncio.ensure_future(transport.ack(message_ids))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)
        self._acks = {}

    async def _finish(self, transport: Transport) -> None:
        """Graceful stop: let deliveries finish within the timeout, nack the rest."""
        if self._tasks:
            logger.info("stopping: finishing %d delivery(ies)", len(self._tasks))
            _, pending = await asyncio.wait(
                set(self._tasks), timeout=self._settings.shutdown_timeout_seconds
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._acks:
            self._send_acks()
        await asyncio.gather(*self._ack_tasks, return_exceptions=True)
        await transport.aclose()
        self._printer.flush()

    def _log(self, message: WireMessage, result: DeliveryResult | None, note: str = "") -> None:
        if result is None:
            webhook_id = message.envelope.webhook_id
            self._printer.line(f"{webhook_id} {message.message_id} {note}")
            return
        self._printer.delivery(message, result)
