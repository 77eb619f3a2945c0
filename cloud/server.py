"""Run the cloud under uvicorn."""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from webhook_connect.cloud.config import CONFIG_ENV, CloudConfig
from webhook_connect.cloud.logs import logging_config, resolve_format

# prometheus_client's multiprocess mode (cloud/metrics.py): where every worker keeps its values.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def run(config: CloudConfig) -> None:
    """Serve until SIGINT/SIGTERM. The config is already validated."""
    os.environ[CONFIG_ENV] = config.to_environment()
    # Set before any process imports prometheus_client, which reads it once at import; fresh,
    # so counts start at zero like the process.
    metrics_dir = tempfile.mkdtemp(prefix="webhook-connect-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    try:
        serve(config)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def serve(config: CloudConfig) -> None:
    """uvicorn with the cloud's settings, in the foreground."""
    uvicorn.run(
        "webhook_connect.cloud.app:app_from_environment",
        factory=True,
        host=config.host,
        port=config.port,
        workers=config.workers,
        log_level=config.log_level,
        # Applied by uvicorn in every worker: one stderr handler, JSON or text.
        log_config=logging_config(resolve_format(config.log_format), config.log_level),
        loop="auto",
        http="auto",
        access_log=config.log_level in ("debug", "trace"),
        server_header=False,
        proxy_headers=False,
        # Evict dead connectors within seconds; connectors only send small
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
