"""Start the connector from validated settings; map the outcome to an exit status."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.dedup import DeliveredLog
from webhook_connect.connector.delivery import Deliverer, HttpDeliverer, target_proxies
from webhook_connect.connector.httpclient import HttpClient
from webhook_connect.connector.runner import Runner
from webhook_connect.connector.transports import open_transport
from webhook_connect.shared.config.delivery import DeliveryPlan


def state_path(settings: ConnectorSettings) -> Path:
    """Where the delivered log of this cloud, channel and group lives."""
    if settings.state_dir:
        base = Path(settings.state_dir)
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "webhook-connect"
    cloud = hashlib.sha256(settings.cloud_url.encode()).hexdigest()[:8]
    return base / f"{cloud}-{settings.channel}-{settings.group}.delivered"


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("webhook_connect")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


async def serve(settings: ConnectorSettings, plans: Mapping[str, DeliveryPlan] | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = HttpClient(
        max_connections_per_host=max(settings.max_concurrent_requests, 1),
        proxies=target_proxies(),  # the environment's, loopback direct (connector/proxy.py)
    )
    delivered = DeliveredLog(state_path(settings), settings.dedup_capacity)
    deliverer: Deliverer = HttpDeliverer(settings, client)
    if plans is not None:
        from webhook_connect.connector.modules import ModuleDeliverer

        deliverer = ModuleDeliverer(plans)
    if settings.routes or settings.events:
        # Only then: without routes or an events filter, no per-message routing cost at all.
        from webhook_connect.connector.modules import ModuleDeliverer
        from webhook_connect.connector.router import RoutingDeliverer

        modules = deliverer if isinstance(deliverer, ModuleDeliverer) else None
        deliverer = RoutingDeliverer(settings, HttpDeliverer(settings, client), modules)
    try:
        await deliverer.start()
        runner = Runner(settings, deliverer, delivered, open_transport)
        return await runner.run(stop)
    finally:
        delivered.close()
        await deliverer.aclose()
        await client.aclose()


def run(settings: ConnectorSettings, plans: Mapping[str, DeliveryPlan] | None = None) -> int:
    """Run until SIGINT/SIGTERM (0) or a refusal by the cloud (1)."""
    configure_logging()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings, plans))
    return uvloop.run(serve(settings, plans))
