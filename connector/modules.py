"""Module mode: deliver each message through the output modules its webhook names.

The same registry, plans and retry policy as the cloud's direct delivery; the verdict maps onto
the HTTP mode's outcomes, so acks, nacks and the delivery lines work the same.
"""

from __future__ import annotations

from collections.abc import Mapping

from webhook_connect.connector.delivery import DeliveryResult
from webhook_connect.shared.config.delivery import DeliveryPlan
from webhook_connect.shared.frames import WireMessage
from webhook_connect.shared.modules import Message
from webhook_connect.shared.modules.pipeline import Dispatcher
from webhook_connect.shared.policy import Outcome


class ModuleDeliverer:
    """Delivers messages by the plans of ``webhooks_config``."""

    def __init__(self, plans: Mapping[str, DeliveryPlan]) -> None:
        self._dispatcher = Dispatcher(plans)

    async def start(self) -> None:
        await self._dispatcher.start()

    def knows(self, webhook_id: str) -> bool:
        """Whether a plan takes this webhook (its own, or ``"*"``)."""
        return self._dispatcher.knows(webhook_id)

    async def aclose(self) -> None:
        await self._dispatcher.aclose()

    async def deliver(self, message: WireMessage) -> DeliveryResult:
        verdict = await self._dispatcher.deliver(
            Message.of(message.message_id, message.attempt, message.envelope)
        )
        if verdict.delivered:
            outcome = Outcome.DELIVERED
        else:
            outcome = Outcome.RETRY if verdict.retry else Outcome.REJECTED
        return DeliveryResult(
            outcome, verdict.target, None, verdict.reason, verdict.attempts, verdict.seconds
        )
