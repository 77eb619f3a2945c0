"""Start the connector from validated settings; map the outcome to an exit status."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import sys
from pathlib import Path

from connector.config import ConnectorSettings
from connector.dedup import DeliveredLog
from connector.delivery import HttpDeliverer
from connector.httpclient import HttpClient
from connector.runner import Runner
from connector.transports import open_transport


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


async def serve(settings: ConnectorSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = HttpClient(max_connections_per_host=max(settings.max_concurrent_requests, 1))
    delivered = DeliveredLog(state_path(settings), settings.dedup_capacity)
    try:
        runner = Runner(settings, HttpDeliverer(settings, client), delivered, open_transport)
        return await runner.run(stop)
    finally:
        delivered.close()
        await client.aclose()


def run(settings: ConnectorSettings) -> int:
    """Run until SIGINT/SIGTERM (0) or a refusal by the cloud (1)."""
    configure_logging()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))
