"""Run the cloud under uvicorn."""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import signal
import tempfile
from typing import Any

import uvicorn

from webhook_connect.cloud.config import CONFIG_ENV, CloudConfig
from webhook_connect.cloud.logs import logging_config, resolve_format
from webhook_connect.shared.exceptions import ConfigError

logger = logging.getLogger("webhook_connect.cloud")

# prometheus_client's multiprocess mode (cloud/metrics.py): where every worker keeps its values.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def run(config: CloudConfig) -> None:
    """Serve until SIGINT/SIGTERM. The config is already validated."""
    os.environ[CONFIG_ENV] = config.to_environment()
    # Set before any process imports prometheus_client, which reads it once at import; fresh,
    # so counts start at zero like the process.
    metrics_dir = tempfile.mkdtemp(prefix="webhook-connect-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    # uvicorn raises SIGINT/SIGTERM again once it has shut down, so the process would end by
    # the signal (status 130/143). A clean stop exits 0 (docs/CONFIGURATION.md): the signal,
    # raised again, finds a handler that does nothing. uvicorn's own handlers are installed
    # over this one while it serves.
    previous = {sig: signal.signal(sig, _stopped) for sig in STOP_SIGNALS}
    try:
        serve(config)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stopped(signum: int, frame: object) -> None:
    """The stop signal uvicorn raises again after a graceful shutdown: already handled."""


def check_storage(config: CloudConfig) -> None:
    """Raise ConfigError for a cluster URL whose nodes are not one Redis Cluster (cluster
    support disabled, nodes of two clusters): said once, before serving, as no retry would fix
    it. Nodes that do not answer are not judged: the cloud waits for storage."""
    from webhook_connect.cloud.buffers.resp_cluster import is_cluster_url, topology_problem

    storage_url = config.storage_url
    if is_cluster_url(storage_url):
        import asyncio

        problem = asyncio.run(topology_problem(storage_url))
        if problem is not None:
            raise ConfigError("--storage", "", problem)


def serve(config: CloudConfig) -> None:
    """uvicorn with the cloud's settings, in the foreground."""
    # Imported here, not at the top: it imports prometheus_client, which must not be imported
    # before run() has set PROMETHEUS_MULTIPROC_DIR.
    from webhook_connect.cloud.connections import (
        ConnectionLimits,
        GuardedHttpProtocol,
        GuardedWebSocketProtocol,
        minimum_descriptors,
        plan_descriptors,
    )

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = plan_descriptors(config.max_open_connections, soft, hard)
    if plan is None:
        raise ConfigError(
            "--max-open-connections",
            "",
            f"the descriptor limit (ulimit -n {soft}) is below the {minimum_descriptors()} "
            "the cloud needs",
        )
    if plan.nofile != soft:
        # Inherited by uvicorn's worker processes.
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan.nofile, hard))
    if plan.lowered:
        logger.warning(
            "open connections per process lowered from %d to %d to fit the descriptor limit "
            "(ulimit -n %d); raise it to allow more",
            config.max_open_connections,
            plan.max_open,
            plan.nofile,
        )
    limits = ConnectionLimits(config.header_timeout, config.body_timeout, plan.max_open)
    # uvicorn takes a protocol class; a partial (which pickles, for --workers) carries the limits
    # into every worker process, where each keeps its own count.
    http: Any = functools.partial(GuardedHttpProtocol, limits=limits)
    ws: Any = functools.partial(GuardedWebSocketProtocol, limits=limits)
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
        http=http,
        ws=ws,
        # Small enough that one burst of accepts cannot run the process out of descriptors.
        backlog=plan.backlog,
        # A kept-alive connection idle between requests is closed after this (uvicorn's
        # default, stated: cloud/connections.py relies on it being finite).
        timeout_keep_alive=5,
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
