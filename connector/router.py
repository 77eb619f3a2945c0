"""Routed delivery: each message to the destination its route names (connector/routing.py).

Used only when ``routes`` or ``events`` are configured, so a connector without them keeps the
plain HTTP or module deliverer and pays nothing per message for routing.
"""

from __future__ import annotations

import logging

from webhook_connect.connector.config import ConnectorSettings, Target
from webhook_connect.connector.delivery import DeliveryResult, HttpDeliverer
from webhook_connect.connector.modules import ModuleDeliverer
from webhook_connect.connector.routing import DEFAULT, Router
from webhook_connect.shared.frames import WireMessage
from webhook_connect.shared.policy import Outcome

logger = logging.getLogger("webhook_connect.connector")

# The reason an unmatched message is dead-lettered with (``"unmatched": "nack"``).
UNMATCHED_REASON = "unmatched"


class RoutingDeliverer:
    """Routes first, then the fallback (``targets`` / ``default_target``, or the module mode's
    plans), then the ``unmatched`` policy: ack and count, or dead-letter."""

    def __init__(
        self,
        settings: ConnectorSettings,
        http: HttpDeliverer,
        modules: ModuleDeliverer | None = None,
    ) -> None:
        self._settings = settings
        self._http = http
        self._modules = modules
        self._router = Router([route.match for route in settings.routes], settings.event_names)
        self._destinations: list[Target | ModuleDeliverer] = []
        for route in settings.routes:
            if route.target is not None:
                self._destinations.append(route.target)
            else:
                assert route.plan is not None, "load_connector_settings builds module plans"
                self._destinations.append(ModuleDeliverer({"*": route.plan}))
        self._nack = settings.unmatched == "nack"
        # Messages neither a route nor a fallback took, since start.
        self.unmatched = 0

    def _module_deliverers(self) -> list[ModuleDeliverer]:
        found = [d for d in self._destinations if isinstance(d, ModuleDeliverer)]
        return found + ([self._modules] if self._modules is not None else [])

    async def start(self) -> None:
        await self._http.start()
        for deliverer in self._module_deliverers():
            await deliverer.start()

    async def aclose(self) -> None:
        for deliverer in self._module_deliverers():
            await deliverer.aclose()
        await self._http.aclose()

    async def deliver(self, message: WireMessage) -> DeliveryResult:
        envelope = message.envelope
        choice = self._router.decide(envelope.webhook_id, envelope.headers, envelope.body)
        if choice >= 0:
            destination = self._destinations[choice]
            if isinstance(destination, Target):
                return await self._http.deliver_to(message, destination)
            return await destination.deliver(message)
        if choice == DEFAULT:
            if self._modules is not None:
                if self._modules.knows(envelope.webhook_id):
                    return await self._modules.deliver(message)
            else:
                target = self._settings.target_for(envelope.webhook_id)
                if target is not None:
                    return await self._http.deliver_to(message, target)
        return self._unmatched()

    def _unmatched(self) -> DeliveryResult:
        """No route, filter or fallback took it: the delivery line says ``unmatched``."""
        self.unmatched += 1
        if self._nack:
            return DeliveryResult(Outcome.REJECTED, "-", error=UNMATCHED_REASON, unmatched=True)
        # Acked: the count on the delivery line is the counter's value since start.
        note = f"{UNMATCHED_REASON} (acked, {self.unmatched} so far)"
        return DeliveryResult(Outcome.DELIVERED, "-", error=note, unmatched=True)
