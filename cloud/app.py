"""The cloud's ASGI application: ingest fast path, health, readiness, background upkeep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from urllib.parse import unquote

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from webhook_connect.cloud import masking
from webhook_connect.cloud.admin import admin_routes
from webhook_connect.cloud.admin.common import has_admin_token
from webhook_connect.cloud.buffers import Buffer, open_buffer
from webhook_connect.cloud.config import CloudConfig, config_from_environment
from webhook_connect.cloud.dashboard import dashboard
from webhook_connect.cloud.direct import DirectDelivery
from webhook_connect.cloud.ingest import PREFIX, IngestEndpoint
from webhook_connect.cloud.metrics import MetricsRoute
from webhook_connect.cloud.openapi import DOCS_PAGE, openapi_document
from webhook_connect.cloud.provisioning import provision
from webhook_connect.cloud.publicurl import bound_base, start_up_lines
from webhook_connect.cloud.pullroutes import PullRoutes
from webhook_connect.cloud.reloader import ConfigReloader, Reloaded
from webhook_connect.cloud.responses import refusal_response
from webhook_connect.cloud.security.guard import build_guards
from webhook_connect.cloud.security.inbound import Services
from webhook_connect.cloud.smee import SmeeRoute
from webhook_connect.cloud.stream import StreamEndpoint, stream_channel
from webhook_connect.shared.exceptions import HttpRefusal, StorageError

logger = logging.getLogger("webhook_connect.cloud")

HOUSEKEEPING_INTERVAL = 5.0
PROVISION_RETRY_MAX = 5.0
# How long start-up waits for the first provisioning attempt before serving: a cloud whose
# storage answers serves ready from its first request (RabbitMQ's new queues take 2 s to be
# saved, docs/STORAGE-RABBITMQ.md); one whose storage fails serves at once, not ready.
PROVISION_FIRST_WAIT = 10.0
# Answered, never raised (a raised instance would keep the frames of its last raise).
DOCS_DISABLED = HttpRefusal(404, "docs_disabled", "start the cloud with --public-docs")


class CloudApp:
    """Routes ``/webhook/...`` straight to the ingest endpoint; everything else to Starlette."""

    def __init__(self, config: CloudConfig, buffer: Buffer | None = None) -> None:
        self.config = config
        self.buffer = buffer or open_buffer(config.storage_url)
        # Outbound calls of checks (token introspection, reCAPTCHA): no redirects followed.
        self.http = httpx.AsyncClient(timeout=10.0, follow_redirects=False)
        services = Services(remember=self.buffer.remember, http=self.http)
        source = config.webhooks_path or "webhooks.json"
        self.ingest = IngestEndpoint(build_guards(config.webhooks, services, source), self.buffer)
        self.reloader = ConfigReloader(config, services, self._apply)
        self.masker = masking.SecretMasker()
        self.masker.configure(config.webhooks)
        self.direct = DirectDelivery(self.buffer)
        self._tasks: list[asyncio.Task[None]] = []
        pull = PullRoutes(self.buffer)
        self.stream = StreamEndpoint(self.buffer)
        self.router: ASGIApp = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/ready", self.ready),
                Route("/metrics", MetricsRoute(self.buffer, config.workers).scrape),
                WebSocketRoute("/connect/stream/{channel}", self.stream.handle),
                Route("/connect/stream/{channel}/sse", pull.sse),
                Route("/connect/stream/{channel}/poll", pull.poll),
                Route("/connect/ack", pull.ack, methods=["POST"]),
                Route("/smee/{channel}", SmeeRoute(self.buffer).stream),
                Route("/openapi.json", self.openapi),
                Route("/docs", self.docs),
                Route("/ui", dashboard),
                *admin_routes(config.admin_token, self.buffer, self.reloader),
            ],
            lifespan=self.lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX):
            await self.ingest(scope, receive, send)
        elif scope["type"] == "websocket" and (channel := stream_channel(scope["path"])):
            # Straight to the stream too: a connector's idle connection then keeps no frames
            # of the middleware and router layers for its lifetime.
            await self.stream.serve(scope, receive, send, channel)
        else:
            await self.router(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        tried = asyncio.Event()
        self._provisioned = asyncio.create_task(self._provision_until_done(tried))
        # Serve ready from the first request when storage is up; otherwise keep trying.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(tried.wait(), PROVISION_FIRST_WAIT)
        self._tasks = [
            self._provisioned,
            asyncio.create_task(self._housekeep_forever()),
            asyncio.create_task(self.reloader.watch_forever()),
        ]
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.direct.aclose()
            await self.http.aclose()
            await self.buffer.aclose()

    async def _apply(self, reloaded: Reloaded) -> None:
        """Take a reloaded ``webhooks.json`` into use: channels and tokens first, then ingest."""
        await provision(self.buffer, reloaded.config)
        self.masker.configure(reloaded.config.webhooks)
        added = {
            webhook_id: webhook
            for webhook_id, webhook in reloaded.config.webhooks.items()
            if webhook_id not in self.config.webhooks
        }
        base = self.config.public_url or bound_base(self.config.host, self.config.port)
        for line in start_up_lines(base, added):
            logger.info("%s (new)", line)
        self.config = reloaded.config
        self.ingest.guards = reloaded.guards
        await self.direct.apply(reloaded.config.webhooks)

    async def _provision_until_done(self, tried: asyncio.Event) -> None:
        """Provision until it works; ``tried`` is set once the first attempt has ended."""
        # Storage may come up after us (a Redis restart): keep trying, stay not-ready meanwhile.
        delay = 0.1
        while True:
            try:
                await provision(self.buffer, self.config)
            except StorageError as exc:
                tried.set()
                logger.warning("storage not ready, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PROVISION_RETRY_MAX)
            else:
                await self.direct.apply(self.config.webhooks)
                self.ingest.is_ready = True
                tried.set()
                logger.info(
                    "storage %s ready with %d channel(s)",
                    _safe_url(self.config.storage_url),
                    len(self.config.channels()),
                )
                return

    async def _housekeep_forever(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                for spec in await self.buffer.list_channels():
                    await self.buffer.housekeep(spec.name)
                    # Long-poll connectors that stopped polling, replicas that died: what
                    # their connections held goes back to the channel.
                    await self.buffer.reap_connections(spec.name)
                    # A group nobody reads keeps every message and would fill the channel.
                    for group in await self.buffer.drop_idle_groups(spec.name):
                        logger.warning(
                            "dropped group %r of %r: no connection for %d s",
                            group,
                            spec.name,
                            spec.group_idle_seconds,
                        )
            except StorageError as exc:
                logger.warning("housekeeping skipped: %s", exc)
            except Exception:  # never let one bad turn end upkeep for good
                logger.exception("housekeeping failed; trying again next time")

    def _docs_refusal(self, request: Request) -> Response | None:
        """404 unless the docs are public or the admin token came: the per-webhook document
        tells strangers which webhooks exist and which have no authentication."""
        if self.config.public_docs or has_admin_token(self.config.admin_token, request):
            return None
        return refusal_response(DOCS_DISABLED)

    async def openapi(self, request: Request) -> Response:
        if refusal := self._docs_refusal(request):
            return refusal
        detailed = has_admin_token(self.config.admin_token, request)
        return JSONResponse(openapi_document(self.ingest.guards, detailed=detailed))

    async def docs(self, request: Request) -> Response:
        refusal = self._docs_refusal(request)
        return refusal or HTMLResponse(DOCS_PAGE.html, headers=DOCS_PAGE.headers)

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> JSONResponse:
        """Public answers say only what is wrong; the storage URL and the error text are for
        the log and the admin token (a probe or a stranger needs no more)."""
        admin = has_admin_token(self.config.admin_token, request)
        try:
            await self.buffer.ping()
        except StorageError as exc:
            logger.warning("not ready: storage %s: %s", _safe_url(self.config.storage_url), exc)
            answer = {"status": "unavailable", "reason": "storage"}
            if admin:
                answer |= {"storage": _safe_url(self.config.storage_url), "detail": str(exc)}
            return JSONResponse(answer, 503, {"retry-after": "2"})
        if not self.ingest.is_ready:
            return JSONResponse({"status": "provisioning"}, 503, {"retry-after": "1"})
        if admin:
            return JSONResponse({"status": "ready", "storage": _safe_url(self.config.storage_url)})
        return JSONResponse({"status": "ready"})


def _safe_url(url: str) -> str:
    """The storage URL without its passwords, for logs and answers: its own user info, and
    that of every URL in its query (``amqp://…?registry=redis://user:pass@…``, the nested URL
    percent-encoded or not)."""
    base, mark, query = url.partition("?")
    scheme, sep, rest = base.partition("://")
    if "@" in rest:  # the last one: a password may hold an unencoded "@"
        rest = "***@" + rest.rsplit("@", 1)[1]
    fields = []
    for field in query.split("&") if query else []:
        key, equals, value = field.partition("=")
        nested = unquote(value)
        if "://" in nested:  # shown decoded: this is for reading, not for connecting
            value = _safe_url(nested)
        fields.append(key + equals + value)
    return scheme + sep + rest + mark + "&".join(fields)


def create_app(config: CloudConfig) -> CloudApp:
    return CloudApp(config)


def app_from_environment() -> CloudApp:
    """uvicorn factory, run in every worker process after uvicorn configured logging."""
    app = CloudApp(config_from_environment())
    masking.install(app.masker)
    return app
