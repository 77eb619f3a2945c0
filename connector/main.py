"""Start the connector from validated settings; map the outcome to an exit status."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from webhook_connect.connector.config import ConnectorSettings
from webhook_connect.connector.dedup import DeliveredLog
from webhook_connect.connector.delivery import Deliverer, HttpDeliverer, target_proxies
from webhook_connect.connector.httpclient import HttpClient
from webhook_connect.connector.logs import configure_logging
from webhook_connect.connector.metrics import Metrics, MetricsServer
from webhook_connect.connector.printer import LinePrinter
from webhook_connect.connector.runner import Runner
from webhook_connect.connector.transports import open_transport
from webhook_connect.shared.config.delivery import DeliveryPlan

logger = logging.getLogger("webhook_connect.connector")


def state_path(settings: ConnectorSettings) -> Path:
    """Where the delivered log of this cloud, channel and group lives."""
    if settings.state_dir:
        base = Path(settings.state_dir)
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "webhook-connect"
    cloud = hashlib.sha256(settings.cloud_url.encode()).hexdigest()[:8]
    return base / f"{cloud}-{settings.channel}-{settings.group}.delivered"


async def serve(
    settings: ConnectorSettings,
    plans: Mapping[str, DeliveryPlan] | None,
    printer: LinePrinter | None = None,
) -> int:
    metrics = Metrics()
    endpoint: MetricsServer | None = None
    if settings.metrics_port is not None:
        host, port = settings.metrics_host, settings.metrics_port
        endpoint = MetricsServer(metrics, host, port, settings.cloud_url, settings.channel)
        try:
            await endpoint.start()
        except OSError as exc:
            logger.error("cannot serve health and metrics on %s:%d: %s", host, port, exc)
            return 1
    try:
        return await _serve(settings, plans, printer, metrics)
    finally:
        if endpoint is not None:
            await endpoint.aclose()


async def _serve(
    settings: ConnectorSettings,
    plans: Mapping[str, DeliveryPlan] | None,
    printer: LinePrinter | None,
    metrics: Metrics,
) -> int:
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
        runner = Runner(
            settings, deliverer, delivered, open_transport, printer=printer, metrics=metrics
        )
        return await runner.run(stop)
    finally:
        delivered.close()
        await deliverer.aclose()
        await client.aclose()


def run(
    settings: ConnectorSettings,
    plans: Mapping[str, DeliveryPlan] | None = None,
    *,
    log_format: str = "auto",
    log_level: str = "info",
) -> int:
    """Run until SIGINT/SIGTERM (0) or a refusal by the cloud (1)."""
    printer = configure_logging(log_format, log_level)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings, plans, printer))
    return uvloop.run(serve(settings, plans, printer))
