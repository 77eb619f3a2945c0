"""Live reload of ``webhooks.json``: a valid new file takes effect without a restart; an invalid
one is refused with its reason and the running configuration stays.

The file is polled (size, mtime and a content hash), which works the same on every filesystem,
in containers and for editors that replace the file instead of writing it in place. A swap is a
single assignment of the compiled guards, so a request in progress finishes under the guard it
started with and none is dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from webhook_connect.cloud.config import CloudConfig
from webhook_connect.cloud.security.guard import Guard, build_guards
from webhook_connect.cloud.security.inbound import Services
from webhook_connect.shared.config import load_connections, load_webhooks
from webhook_connect.shared.exceptions import ConfigError, StorageError

logger = logging.getLogger("webhook_connect.cloud")

POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class Reloaded:
    """A configuration that took effect."""

    config: CloudConfig
    guards: dict[str, Guard]


def fingerprint(path: Path) -> tuple[int, int, str] | None:
    """What identifies the file's current content, or None if it cannot be read now."""
    try:
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, digest


class ConfigReloader:
    """Loads ``webhooks.json`` again on demand or when it changes, and hands it to ``apply``."""

    def __init__(
        self,
        config: CloudConfig,
        services: Services,
        apply: Callable[[Reloaded], Awaitable[None]],
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.config = config
        self._services = services
        self._apply = apply
        self._interval = interval
        self._lock = asyncio.Lock()
        path = config.webhooks_path
        self._path = None if path is None else Path(path)
        self._seen = None if self._path is None else fingerprint(self._path)

    async def reload(self) -> Reloaded:
        """Load, validate, compile and apply the file; :class:`ConfigError` leaves all as it was."""
        if self._path is None:
            raise ConfigError("--webhooks", "", "the cloud was started without a webhooks file")
        async with self._lock:
            seen = fingerprint(self._path)
            source = str(self._path)
            connections = load_connections(self.config.connections_path)
            webhooks = load_webhooks(self._path, connections)
            guards = build_guards(webhooks, self._services, source)
            config = dataclasses.replace(self.config, webhooks=webhooks)
            reloaded = Reloaded(config, guards)
            await self._apply(reloaded)
            self.config = config
            self._seen = seen
            return reloaded

    async def watch_forever(self) -> None:
        """Reload whenever the file's content changes."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(self._interval)
            current = fingerprint(self._path)
            if current is None or current == self._seen:
                continue
            try:
                reloaded = await self.reload()
            except ConfigError as exc:
                self._seen = current  # report a bad file once, not every second
                logger.error("webhooks.json not reloaded, the running one stays: %s", exc)
            except StorageError as exc:
                logger.warning("webhooks.json reload postponed, storage failed: %s", exc)
            except Exception:
                # Whatever a file can provoke, the watcher must outlive it: ended, it would
                # silently ignore every later edit, valid ones included.
                self._seen = current
                logger.exception("webhooks.json not reloaded, the running one stays")
            else:
                logger.info("webhooks.json reloaded: %d webhook(s)", len(reloaded.config.webhooks))
