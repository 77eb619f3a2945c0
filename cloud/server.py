"""Run the cloud under uvicorn."""

from __future__ import annotations

import logging
import os

import uvicorn

from cloud.config import CONFIG_ENV, CloudConfig


def run(config: CloudConfig) -> None:
    """Serve until SIGINT/SIGTERM. The config is already validated."""
    logging.basicConfig(
        level=logging.getLevelName(config.log_level.upper()) if config.log_level != "trace" else 5,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ[CONFIG_ENV] = config.to_environment()
    uvicorn.run(
        "cloud.app:app_from_environment",
        factory=True,
        host=config.host,
        port=config.port,
        workers=config.workers,
        log_level=config.log_level,
        loop="auto",
        http="auto",
        access_log=config.log_level in ("debug", "trace"),
        server_header=False,
        proxy_headers=False,
        # Evict dead connectors within seconds (PRODUCT.md §5); connectors only send small
        # frames (acks), so anything large is refused.
        ws_ping_interval=5.0,
        ws_ping_timeout=10.0,
        ws_max_size=1024 * 1024,
        # Bodies are mostly small and often already compact; deflate costs more CPU per
        # message than it saves on loopback and LAN links.
        ws_per_message_deflate=False,
        # Streams and long polls never finish by themselves: on SIGTERM give them a moment,
        # then end them (what they held goes back to the channel).
        timeout_graceful_shutdown=3,
    )
