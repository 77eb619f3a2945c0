"""RabbitMQ backend (``amqp://…?registry=…``): the broker holds the messages, a companion
store the registry and the limits. The mapping and what it cannot keep: docs/STORAGE-RABBITMQ.md.

A channel is a durable fanout exchange; each consumer group a durable quorum queue bound to it,
so each group gets every message. ``append`` returns only after the broker confirmed the
publish. A delivery is held by this replica's AMQP channel until it is acked, retried (via a
per-group retry queue whose TTL is the retry delay and whose dead-letter exchange routes the
message back) or dead-lettered (republished to the ``wc::dead`` exchange). Every republish is
confirmed before the original is acked, so a crash between the two duplicates, never loses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
)

from webhook_connect.cloud.buffers.base import (
    ACK_TIMEOUT,
    CONNECTION_CLOSED,
    COUNTERS,
    DEFAULT_GROUP,
    EVENTS_KEPT,
    Buffer,
    ChannelEvent,
    ChannelSpec,
    ChannelStats,
    ConnectionRecord,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    GroupInfo,
    TokenRecord,
    decode_attempts,
    encode_attempts,
)
from webhook_connect.cloud.buffers.peers import Peers
from webhook_connect.cloud.buffers.room import Room
from webhook_connect.cloud.notifier import Notifier
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import (
    ChannelFull,
    StorageError,
    StorageUnavailable,
    UnknownChannel,
)
from webhook_connect.shared.frames import nack_reason
from webhook_connect.shared.modules.amqp import PublishedProperties

CONNECT_TIMEOUT = 5.0
# After a failed connect, every step fails at once for this long instead of dialling again:
# a broker that is down must not hold each webhook for a connect attempt.
RECONNECT_BACKOFF = 0.5
# A publish the broker has not confirmed by then is answered 503 (see ``_publish``).
PUBLISH_TIMEOUT = 10.0
# /ready (``ping``) answers from the last publish, a webhook's or its own probe's (``Publishes``):
# one that went through serves for READY_FRESH seconds, one that failed for FAILURE_KEPT; past
# that, a probe publish the broker has not confirmed within PROBE_TIMEOUT is a 503.
READY_FRESH = 1.0
FAILURE_KEPT = 2.0
PROBE_TIMEOUT = 2.0
PERSISTENT = 2  # AMQP delivery_mode: written to disk
# A read of this many messages or more takes them with a short-lived consumer, fewer with
# ``basic.get`` each (see ``_take_batch``); a batch waits at most this long for its messages.
BATCH_AT_LEAST = 4
BATCH_WAIT = 0.02
# append_once ids kept for repeats: past this many, the expired ones are dropped.
ONCE_PRUNE_AT = 10_000
TTL_BACKSTOP_SECONDS = 300
# Provisioning a channel whose queue this replica created, and an append into it, return only
# this long after this replica last created a quorum queue. RabbitMQ 3.10 (Ra 2.2) confirms
# publishes into a new quorum queue at once, but registers its Raft member in a file
# (quorum/<node>/names.dets) it saves only once that file has gone 1 s without a change
# (measured: 1.00 s after the last declaration, every time); a node killed before that loses
# the queue and everything in it. 1 s of slack over the broker's timer
# (docs/STORAGE-RABBITMQ.md, "A new queue").
REGISTRATION_MARGIN = 2.0

logger = logging.getLogger("webhook_connect.rabbitmq")
# Headers a stored message carries besides its body.
META = "x-wc-meta"
ATTEMPTS = "x-wc-attempts"  # deliveries that did not end in an ack so far
LOG = "x-wc-log"
GROUP = "x-wc-group"
REASON = "x-wc-reason"
DEAD_AT = "x-wc-dead-at"
ORIGINAL = "x-wc-message-id"


def split_url(url: str) -> tuple[str, str, str]:
    """``amqp://…?registry=X&prefix=P`` to the broker URL (without either), X and the prefix
    of every exchange and queue name (``wc`` unless given: deployments sharing a vhost).

    Raises ValueError naming the key when the registry is missing: RabbitMQ has nowhere to
    keep channels and tokens every replica sees."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    registry = query.pop("registry", [""])[-1]
    prefix = query.pop("prefix", ["wc"])[-1] or "wc"
    if not registry:
        raise ValueError(
            f"storage URL {url!r}: key 'registry' is required with amqp:// "
            "(a redis:// URL shared by every replica, or sqlite:///file.db for one replica)"
        )
    if registry.startswith(("amqp://", "amqps://")):
        raise ValueError(f"storage URL {url!r}: key 'registry' must be redis:// or sqlite:///")
    broker = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    return broker, registry, prefix


@dataclass(frozen=True, slots=True)
class Names:
    """The broker-side names of one deployment's channels, groups and dead letters. Channel
    and group names never hold ``:``, so no two of these can be the same name."""

    prefix: str = "wc"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}::dead"

    @property
    def peers_exchange(self) -> str:
        return f"{self.prefix}::peers"

    @property
    def probe_queue(self) -> str:
        return f"{self.prefix}::ready"

    def exchange(self, channel: str) -> str:
        return f"{self.prefix}:{channel}"

    def group_queue(self, channel: str, group: str) -> str:
        return f"{self.prefix}:{channel}:g:{group}"

    def retry_queue(self, channel: str, group: str) -> str:
        return f"{self.prefix}:{channel}:r:{group}"

    def dead_queue(self, channel: str) -> str:
        return f"{self.prefix}:{channel}:dead"


def group_arguments(spec: ChannelSpec) -> dict[str, Any]:
    """A group queue's limits: fixed when it is declared (RabbitMQ refuses other arguments
    later; a policy changes them)."""
    return {
        "x-queue-type": "quorum",
        "x-max-length": spec.max_queue_size,
        "x-overflow": "reject-publish",
        # Housekeeping expires and counts; the broker drops what nobody did, a while later.
        "x-message-ttl": (spec.ttl_seconds + TTL_BACKSTOP_SECONDS) * 1000,
    }


def retry_arguments(spec: ChannelSpec, group_queue: str) -> dict[str, Any]:
    """The retry queue holds a nacked message for the retry delay, then the broker routes it
    back to its group's queue (dead-lettering by TTL, through the default exchange)."""
    delay = min(spec.retry_delay_seconds, spec.ack_timeout_seconds)
    return {
        "x-message-ttl": max(1, round(delay * 1000)),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": group_queue,
    }


# The probe's queue: a quorum queue, as the groups' are (a publish takes the same path: a Raft
# write and a confirm), keeping only the latest probe.
PROBE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum", "x-max-length": 1}


@dataclass(slots=True)
class Publishes:
    """What the last publish did, for /ready: the broker answering a channel open is no sign
    it takes publishes (a memory or disk alarm blocks every publishing connection; a quorum
    queue without a leader never confirms), so readiness follows the path ingest uses. Pure:
    the caller passes ``time.monotonic()``."""

    at: float = -math.inf  # when the last publish ended
    failure: str = ""  # why it failed; "" when the broker answered it

    def answered(self, now: float) -> None:
        """The broker confirmed the publish, or refused it (a full queue: it is alive)."""
        self.at, self.failure = now, ""

    def failed(self, now: float, reason: str) -> None:
        self.at, self.failure = now, reason or "failed"

    def is_ready(self, now: float) -> bool | None:
        """Ready or not from the last publish; None when it is too old to tell (probe)."""
        age = now - self.at
        if self.failure:
            return False if age < FAILURE_KEPT else None
        return True if age < READY_FRESH else None


@dataclass(slots=True)
class Held:
    """A delivery this replica holds for a consumer, until it is settled."""

    message: AbstractIncomingMessage
    channel: str
    group: str
    consumer: str
    attempt: int
    held_at: float
    envelope: Envelope
    log: list[DeliveryAttempt] = field(default_factory=list)


def _number(value: object) -> float:
    """A numeric header (absent, or of an unexpected type: 0)."""
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return float(value) if isinstance(value, int | float | str) else 0.0
    except ValueError:
        return 0.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: its body and its AMQP properties."""

    body: bytes
    properties: PublishedProperties


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RabbitMQBuffer:
    """Messages in RabbitMQ, registry and limits in the companion store ``registry=`` names."""

    def __init__(self, url: str) -> None:
        from webhook_connect.cloud.buffers import open_buffer

        self.url = url
        self._broker_url, registry_url, prefix = split_url(url)
        self._names = Names(prefix)
        self._registry: Buffer = open_buffer(registry_url)
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None  # reads and acks: holds the deliveries
        self._publisher: AbstractChannel | None = None  # confirmed publishes
        self._query: AbstractChannel | None = None  # queue depths (a 404 closes it, not ours)
        self._connect_lock = asyncio.Lock()
        self._down_until = 0.0
        self._rooms: dict[str, Room] = {}
        self._measuring: dict[str, asyncio.Future[Room]] = {}
        self._declared: set[str] = set()
        self._created_at = -math.inf  # when this replica last created a quorum queue
        self._young: set[str] = set()  # channels with a queue created here, maybe not saved
        self._held: dict[str, Held] = {}
        self._notifier = Notifier()
        # This replica's counters, feed and ack counts (docs/STORAGE-RABBITMQ.md: not shared).
        self._counters: dict[str, Counter[str]] = {}
        self._events: dict[str, deque[ChannelEvent]] = {}
        self._acked_by: Counter[tuple[str, str]] = Counter()
        self._once: dict[tuple[str, str], tuple[str, float]] = {}
        self._storing: dict[tuple[str, str], asyncio.Future[str]] = {}
        self._batch_lock = asyncio.Lock()
        self._peers = Peers(self._names.peers_exchange, self._answer)
        self._publishes = Publishes()
        self._probing: asyncio.Future[None] | None = None

    # Plumbing -----------------------------------------------------------------------------

    async def _open(self) -> AbstractChannel:
        """The AMQP channel reads and acks share: the deliveries this replica holds are its
        (reconnecting if it closed).

        Shielded, as every channel open and close is: a caller cancelled halfway through the
        handshake (a connection torn down) leaves the AMQP connection out of step, and the
        broker closes it with every delivery this replica holds."""
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        return await asyncio.shield(self._open_shared())

    async def _open_shared(self) -> AbstractChannel:
        async with self._connect_lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            # A closed channel gave its deliveries back to the broker: forget them.
            self._held.clear()
            channel = await self._new_channel()
            try:  # the other replicas reach what it holds through it
                await self._peers.attach(channel)
            except (TimeoutError, OSError, RuntimeError, aiormq.exceptions.AMQPError) as exc:
                await self._close(channel)
                raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
            self._channel = channel
            return self._channel

    async def _open_publisher(self) -> aiormq.abc.AbstractChannel:
        """The confirm-mode channel every publish shares: publishes from concurrent requests
        are in flight together, each awaiting its own confirm. A channel of its own, so a
        publish the broker refuses by closing the channel (an exchange another replica
        deleted) gives back none of the deliveries this replica holds."""
        publisher = self._publisher
        if publisher is None or publisher.is_closed:
            publisher = await asyncio.shield(self._open_channel("_publisher", confirms=True))
        return await publisher.get_underlay_channel()

    async def _open_query(self) -> aiormq.abc.AbstractChannel:
        """The channel depth queries share (a passive declare of a missing queue closes it)."""
        query = self._query
        if query is None or query.is_closed:
            query = await asyncio.shield(self._open_channel("_query", confirms=False))
        return await query.get_underlay_channel()

    async def _open_channel(self, slot: str, *, confirms: bool) -> AbstractChannel:
        async with self._connect_lock:
            channel: AbstractChannel | None = getattr(self, slot)
            if channel is None or channel.is_closed:
                channel = await self._new_channel(confirms=confirms)
                setattr(self, slot, channel)
            return channel

    async def _new_channel(self, *, confirms: bool = True) -> AbstractChannel:
        """A channel on the connection, reconnecting once if the connection is gone."""
        if time.monotonic() < self._down_until:
            raise StorageUnavailable("rabbitmq: the broker did not answer a moment ago")
        for _ in range(2):
            try:
                if self._connection is None or self._connection.is_closed:
                    self._connection = await aio_pika.connect(
                        self._broker_url, timeout=CONNECT_TIMEOUT
                    )
                    self._declared.clear()
                    self._rooms.clear()
                    # The old connection's channels are gone with it, whatever they report;
                    # so are the deliveries its reads channel held (the broker requeued them).
                    self._channel = self._publisher = self._query = None
                    self._held.clear()
                return await self._connection.channel(publisher_confirms=confirms)
            except RuntimeError:  # aiormq: the connection closed under the wrapper
                self._connection = None
            except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                self._down_until = time.monotonic() + RECONNECT_BACKOFF
                raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
        raise StorageUnavailable("rabbitmq: the connection keeps closing")

    async def _scratch(self) -> AbstractChannel:
        """A channel of its own, for steps whose failure must not close the shared one
        (declarations) or that requeue what they read when closed (browsing dead letters)."""
        await self._open()
        return await asyncio.shield(self._new_channel())

    @staticmethod
    async def _close(scratch: AbstractChannel) -> None:
        if not scratch.is_closed:
            await asyncio.shield(scratch.close())

    async def _spec(self, channel: str) -> ChannelSpec:
        spec = await self._registry.get_channel(channel)
        if spec is None:
            raise UnknownChannel(channel)
        return spec

    async def _declare(self, spec: ChannelSpec, groups: list[str]) -> None:
        """The channel's exchange, dead-letter queue and the queues of ``groups``."""
        wanted = [g for g in groups if f"{spec.name}/{g}" not in self._declared]
        if f"{spec.name}/" in self._declared and not wanted:
            return
        scratch = await self._scratch()
        try:
            await scratch.declare_exchange(
                self._names.exchange(spec.name), aio_pika.ExchangeType.FANOUT, durable=True
            )
            dead = await scratch.declare_exchange(
                self._names.dead_exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
            letters = await scratch.declare_queue(self._names.dead_queue(spec.name), durable=True)
            await letters.bind(dead, routing_key=spec.name)
            self._declared.add(f"{spec.name}/")
        except aiormq.exceptions.AMQPError as exc:
            raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
        finally:
            await self._close(scratch)
        for group in wanted:
            queue = self._names.group_queue(spec.name, group)
            if await self._declare_queue(queue, group_arguments(spec)):
                self._young.add(spec.name)
            await self._declare_queue(
                self._names.retry_queue(spec.name, group), retry_arguments(spec, queue)
            )
            scratch = await self._scratch()
            try:
                underlay = await scratch.get_underlay_channel()
                await underlay.queue_bind(queue, self._names.exchange(spec.name))
            except aiormq.exceptions.AMQPError as exc:
                raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
            finally:
                await self._close(scratch)
            self._declared.add(f"{spec.name}/{group}")

    async def _until_registered(self, channel: str) -> None:
        """Return once the broker has saved the registration of ``channel``'s queues: at once
        unless this replica created one of them, else REGISTRATION_MARGIN after the last
        quorum queue this replica created (the broker saves its registry of them only once it
        has gone 1 s unchanged, so each creation puts off the save of the ones before it)."""
        if channel not in self._young:
            return
        wait = self._created_at + REGISTRATION_MARGIN - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
            await self._until_registered(channel)  # a queue created meanwhile puts it off
        else:
            self._young.discard(channel)

    async def _declare_queue(self, name: str, arguments: dict[str, Any]) -> bool:
        """Declare ``name``; whether it was created here. One that exists with other limits is
        kept as it is (RabbitMQ refuses new arguments for a queue: a policy changes them,
        docs/STORAGE-RABBITMQ.md)."""
        scratch = await self._scratch()
        try:
            await scratch.declare_queue(name, passive=True)
            created = False
        except aiormq.exceptions.ChannelNotFoundEntity:  # the broker closed that channel
            created = True
        except aiormq.exceptions.AMQPError as exc:
            raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
        finally:
            await self._close(scratch)
        scratch = await self._scratch()
        try:
            await scratch.declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed:
            logger.warning("queue %s exists with other limits: kept as it is", name)
        except aiormq.exceptions.AMQPError as exc:
            raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
        finally:
            await self._close(scratch)
        if created and arguments.get("x-queue-type") == "quorum":
            self._created_at = time.monotonic()
        return created

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        message: Outgoing,
        channel: str,
        confirm_within: float = PUBLISH_TIMEOUT,
    ) -> None:
        """Publish and wait for the broker's confirm; its refusal is a full channel.

        Straight on the aiormq channel: aio-pika's ``get_exchange`` asks the broker whether
        the exchange exists (a round trip per publish), and its message wrapper costs CPU.
        A confirm that does not come within ``confirm_within`` is a 503: the sender retries, and a
        message the broker stored after all is a duplicate, never a loss. The outcome is
        what /ready answers from (``Publishes``)."""
        try:
            amqp = await self._open_publisher()
            await amqp.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=message.properties,
                timeout=confirm_within,
            )
        except StorageUnavailable as exc:  # no channel to publish on
            self._publishes.failed(time.monotonic(), str(exc))
            raise
        except aiormq.exceptions.DeliveryError as exc:
            self._publishes.answered(time.monotonic())
            room = self._rooms.get(channel)
            spec = room.spec if room else await self._registry.get_channel(channel)
            raise ChannelFull(channel, spec.max_queue_size if spec else 0) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            self._publishes.answered(time.monotonic())
            self._forget_channel(channel)
            raise UnknownChannel(channel) from exc
        except (TimeoutError, OSError, RuntimeError, aiormq.exceptions.AMQPError) as exc:
            reason = f"rabbitmq: {exc!r}"
            if isinstance(exc, TimeoutError):
                reason = f"rabbitmq: a publish was not confirmed within {confirm_within:g} s"
            self._publishes.failed(time.monotonic(), reason)
            raise StorageUnavailable(reason) from exc
        self._publishes.answered(time.monotonic())

    def _count(self, channel: str, name: str, n: int = 1) -> None:
        self._counters.setdefault(channel, Counter())[name] += n

    def _event(self, channel: str, kind: str, message_id: str, consumer: str = "") -> None:
        feed = self._events.setdefault(channel, deque(maxlen=EVENTS_KEPT))
        feed.appendleft(ChannelEvent(time.time(), kind, message_id, consumer))

    @staticmethod
    def _message(
        envelope: Envelope, message_id: str, attempts: int, log: list[DeliveryAttempt], **extra: Any
    ) -> Outgoing:
        # String values only, so the properties take the fast encoder (shared/modules/amqp.py).
        headers: dict[str, Any] = {
            META: envelope.encode_meta().decode(),
            ATTEMPTS: str(attempts),
            LOG: encode_attempts(log).decode(),
            **{key: str(value) for key, value in extra.items()},
        }
        return Outgoing(
            envelope.body,
            PublishedProperties(headers=headers, message_id=message_id, delivery_mode=PERSISTENT),
        )

    # MessageQueue -------------------------------------------------------------------------

    async def append(self, envelope: Envelope) -> str:
        """Publish to the channel's exchange; the id is returned once the broker confirmed."""
        return await self._store(await self._prepare(envelope), envelope)

    async def _prepare(self, envelope: Envelope) -> ChannelSpec:
        """The channel's limits, its queues declared, and room for one more message, which
        is counted as taken.

        The broker's ``x-max-length`` counts ready messages only (a quorum queue even lets one
        more in), so the room is checked here with what is retrying and what this replica
        holds, from an estimate measured at most every few hundred milliseconds
        (cloud/buffers/room.py); the broker's limit stays the backstop."""
        room = self._rooms.get(envelope.channel)
        if room is None or room.stale(time.monotonic()):
            room = await self._measure(envelope.channel)
        if room.is_full():
            group, backlog = room.fullest()
            raise ChannelFull(room.spec.name, room.spec.max_queue_size, group, backlog)
        room.added += 1
        return room.spec

    async def _measure(self, channel: str) -> Room:
        """A new measurement of ``channel``'s room; concurrent appends share one."""
        pending = self._measuring.get(channel)
        if pending is None:
            pending = asyncio.ensure_future(self._take_measure(channel))
            self._measuring[channel] = pending
            pending.add_done_callback(lambda _: self._measuring.pop(channel, None))
        return await asyncio.shield(pending)

    async def _take_measure(self, channel: str) -> Room:
        spec = await self._spec(channel)
        groups = [g.name for g in await self._registry.list_groups(channel)]
        await self._declare(spec, groups or [DEFAULT_GROUP])
        started = time.monotonic()
        backlogs = await asyncio.gather(*(self._backlog(channel, g) for g in groups))
        room = Room(spec, {g: b for g, (b, _) in zip(groups, backlogs, strict=True)}, started)
        self._rooms[channel] = room
        return room

    def _freed(self, channel: str) -> None:
        """This replica settled a message of ``channel``: a full estimate is measured again."""
        room = self._rooms.get(channel)
        if room is not None:
            room.freed = True

    def _forget_channel(self, channel: str) -> None:
        """Its limits or groups changed: the next append measures again."""
        self._rooms.pop(channel, None)

    async def _store(self, spec: ChannelSpec, envelope: Envelope) -> str:
        message_id = uuid.uuid4().hex
        message = self._message(envelope, message_id, 0, [])
        await self._publish(self._names.exchange(spec.name), "", message, spec.name)
        # Nothing accepted is lost: not even to a crash in the first second of a new queue.
        await self._until_registered(spec.name)
        self._count(spec.name, "accepted")
        self._event(spec.name, "received", message_id)
        self._notifier.notify(spec.name)
        return message_id

    async def append_once(
        self, envelope: Envelope, key: str, window_seconds: float
    ) -> tuple[str, bool]:
        """The companion's replay key refuses a repeat on every replica; the original id is
        this replica's to know, or asked of the replica that stored it (``""`` if it is gone).
        Concurrent repeats of one key here wait for the first; other keys do not wait."""
        slot = (envelope.channel, key)
        now = time.time()
        known = self._once.get(slot)
        if known is not None and known[1] > now:
            return known[0], False
        pending = self._storing.get(slot)
        if pending is not None:
            return await asyncio.shield(pending), False
        storing: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        storing.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._storing[slot] = storing
        try:
            spec = await self._prepare(envelope)  # a refused delivery is not remembered
            if await self._registry.remember(f"once:{envelope.channel}:{key}", window_seconds):
                message_id, stored = await self._store(spec, envelope), True
                self._remember_once(slot, message_id, now + window_seconds)
            else:
                await self._open()  # listening, for the answer
                answer = await self._peers.ask({"op": "once", "channel": slot[0], "key": key})
                message_id, stored = str(answer.get("id", "")), False
        except BaseException as exc:
            storing.set_exception(exc)
            raise
        else:
            storing.set_result(message_id)
            return message_id, stored
        finally:
            self._storing.pop(slot, None)

    def _remember_once(self, slot: tuple[str, str], message_id: str, until: float) -> None:
        """Keep the id for repeats; what has expired goes when the map has grown."""
        self._once[slot] = (message_id, until)
        if len(self._once) > ONCE_PRUNE_AT:
            now = time.time()
            self._once = {k: v for k, v in self._once.items() if v[1] > now}

    async def read(self, channel: str, group: str, consumer: str, count: int) -> list[Delivery]:
        """``basic.get`` up to ``count`` messages from the group's queue, held for ``consumer``."""
        if not await self._registry.has_group(channel, group):
            return []
        spec = await self._spec(channel)
        await self._declare(spec, [group])
        await asyncio.shield(self._expire_held(spec, group))
        # Shielded: a reader cancelled (its connection closed) between a basic.get and holding
        # what it got would leave that message unacked and untracked on the shared channel,
        # never delivered again. Held, it goes back at the release or the ack timeout.
        return await asyncio.shield(self._take_messages(spec, group, consumer, count))

    async def _take_messages(
        self, spec: ChannelSpec, group: str, consumer: str, count: int
    ) -> list[Delivery]:
        amqp = await self._open()
        name = self._names.group_queue(spec.name, group)
        try:
            # No more than the queue had ready when the read began (at least one: a message
            # given back a moment ago is counted a little later); what arrives meanwhile is
            # the next read's. Unbounded, a read under steady load kept taking messages one
            # round trip each as fast as they arrived, and held back from the consumer what
            # it had taken until the queue ran dry (relay p50 ~100 ms at 1,000 msg/s).
            ready = await self._queue_depth(name) if count >= BATCH_AT_LEAST else count
            want = min(count, max(ready, 1))
            taken: list[Delivery] = []
            if want >= BATCH_AT_LEAST:
                for batched in await self._take_batch(amqp, name, want):
                    delivery = await self._hold(spec, group, consumer, batched)
                    if delivery is not None:
                        taken.append(delivery)
            # One at a time: small reads, the rest of a batch another reader took from, and
            # in place of the expired ones dropped (so a read behind them is not empty).
            queue = await amqp.get_queue(name, ensure=False)
            while len(taken) < want:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                delivery = await self._hold(spec, group, consumer, message)
                if delivery is not None:
                    taken.append(delivery)
        except (TimeoutError, OSError, RuntimeError, aiormq.exceptions.AMQPError) as exc:
            raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
        return taken

    async def _take_batch(
        self, amqp: AbstractChannel, queue: str, want: int
    ) -> list[AbstractIncomingMessage]:
        """Up to ``want`` messages (what the queue has ready) in three round trips, however
        many: a ``basic.get`` per message made a drain as slow as the round trip. A consumer
        whose prefetch is ``want`` takes them in order and is cancelled at once; the prefetch
        bounds what it can receive, so everything it received is held."""
        underlay = await amqp.get_underlay_channel()
        got: list[AbstractIncomingMessage] = []
        complete = asyncio.Event()

        async def received(message: aiormq.abc.DeliveredMessage) -> None:
            got.append(aio_pika.IncomingMessage(message, no_ack=False))
            if len(got) >= want:
                complete.set()

        async with self._batch_lock:  # the prefetch applies to the next consumer of the channel
            await underlay.basic_qos(prefetch_count=want)
            consuming = await underlay.basic_consume(queue, received, no_ack=False)
            try:
                # Fewer arrive when another reader took some since the count.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(complete.wait(), BATCH_WAIT)
            finally:
                await underlay.basic_cancel(consuming.consumer_tag or "")
        # A delivery that arrived before the cancel's answer is handed over by a task created
        # before this one resumed: it has run already.
        await asyncio.sleep(0)
        return got

    async def _hold(
        self, spec: ChannelSpec, group: str, consumer: str, message: AbstractIncomingMessage
    ) -> Delivery | None:
        headers = message.headers or {}
        envelope = Envelope.decode(_text(headers[META]).encode(), message.body)
        # Not x-delivery-count: housekeeping returns the live head message it looked at, and
        # that was no delivery (a replica that died holding one loses that count).
        attempt = int(_number(headers.get(ATTEMPTS))) + 1
        message_id = message.message_id or ""
        if time.time() - envelope.received_at > spec.ttl_seconds:
            await message.ack()
            self._count(spec.name, "expired")
            self._freed(spec.name)
            return None
        log = list(decode_attempts(_text(headers.get(LOG, "[]")).encode()))
        self._held[message_id + "/" + group] = Held(
            message, spec.name, group, consumer, attempt, time.time(), envelope, log
        )
        if attempt > 1:
            self._count(spec.name, "redelivered")
        return Delivery(message_id, attempt, envelope)

    def _take(self, channel: str, group: str, message_id: str, consumer: str) -> Held | None:
        held = self._held.get(message_id + "/" + group)
        if held is None or held.channel != channel or (consumer and held.consumer != consumer):
            return None
        del self._held[message_id + "/" + group]
        return held

    def _claim(self, key: str, held: Held) -> bool:
        """Take ``held`` out of the held set unless another step (a concurrent read's expiry,
        an ack) already did: the key may now name a newer copy of the same message."""
        if self._held.get(key) is not held:
            return False
        del self._held[key]
        return True

    async def ack(self, channel: str, group: str, message_id: str, consumer: str = "") -> bool:
        """Ack what this replica holds; what it does not, the replica holding it acks."""
        if message_id + "/" + group not in self._held:
            return await self._ask_holder("ack", channel, group, message_id, consumer)
        return await self._ack_held(channel, group, message_id, consumer)

    async def _ack_held(self, channel: str, group: str, message_id: str, consumer: str) -> bool:
        held = self._take(channel, group, message_id, consumer)
        if held is None:
            return False
        try:
            await asyncio.shield(held.message.ack())
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
        self._count(channel, "delivered")
        self._freed(channel)
        self._acked_by[(channel, held.consumer)] += 1
        self._event(channel, "delivered", message_id, held.consumer)
        self._notifier.notify(channel)
        return True

    async def nack(
        self,
        channel: str,
        group: str,
        message_id: str,
        *,
        retry: bool,
        consumer: str = "",
        reason: str = "",
    ) -> bool:
        """Nack what this replica holds; what it does not, the replica holding it nacks."""
        if message_id + "/" + group not in self._held:
            return await self._ask_holder(
                "nack", channel, group, message_id, consumer, retry=retry, reason=reason
            )
        return await self._nack_held(channel, group, message_id, consumer, retry, reason)

    async def _nack_held(
        self, channel: str, group: str, message_id: str, consumer: str, retry: bool, reason: str
    ) -> bool:
        held = self._take(channel, group, message_id, consumer)
        if held is None:
            return False
        # Shielded: once taken out of the held set it must be settled (see ``read``).
        await asyncio.shield(self._settle_nack(held, nack_reason(reason, retry), retry))
        return True

    async def _ask_holder(
        self, op: str, channel: str, group: str, message_id: str, consumer: str, **extra: Any
    ) -> bool:
        """Have the replica holding the delivery settle it (an SSE or long-poll ack that
        reached this replica); False when no replica holds it for ``consumer``."""
        await self._open()  # listening, for the answer
        request = {"op": op, "channel": channel, "group": group, "id": message_id}
        answer = await self._peers.ask({**request, "consumer": consumer, **extra})
        return answer.get("ok") is True

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Another replica's request: answered when this replica is the one that knows."""
        op, channel = request.get("op"), str(request.get("channel", ""))
        if op == "once":
            known = self._once.get((channel, str(request.get("key", ""))))
            return {"id": known[0]} if known is not None and known[1] > time.time() else None
        group, message_id = str(request.get("group", "")), str(request.get("id", ""))
        if message_id + "/" + group not in self._held:
            return None
        consumer = str(request.get("consumer", ""))
        if op == "ack":
            return {"ok": await self._ack_held(channel, group, message_id, consumer)}
        if op == "nack":
            retry, reason = bool(request.get("retry")), str(request.get("reason", ""))
            settled = await self._nack_held(channel, group, message_id, consumer, retry, reason)
            return {"ok": settled}
        return None

    async def _settle_nack(self, held: Held, outcome: str, retry: bool) -> None:
        spec = await self._spec(held.channel)
        await self._log(held, outcome)
        if not retry:
            await self._dead_letter(held, outcome)
        elif held.attempt >= spec.max_delivery_attempts:
            await self._dead_letter(held, "max_delivery_attempts")
        else:
            await self._give_back(held, self._names.retry_queue(held.channel, held.group))

    async def _log(self, held: Held, outcome: str) -> None:
        record = await self._registry.get_connection(held.channel, held.consumer)
        held.log.append(
            DeliveryAttempt(
                held.attempt,
                held.held_at,
                held.consumer,
                record.connector_id if record else "",
                outcome,
                time.time() - held.held_at,
            )
        )

    async def _give_back(self, held: Held, queue: str) -> None:
        """Republish (confirmed) to ``queue`` with the attempt counted, then ack the original."""
        message_id = held.message.message_id or ""
        message = self._message(held.envelope, message_id, held.attempt, held.log)
        await self._publish("", queue, message, held.channel)
        await held.message.ack()
        self._notifier.notify(held.channel)

    async def _dead_letter(self, held: Held, reason: str) -> None:
        message = self._message(
            held.envelope,
            uuid.uuid4().hex,
            held.attempt,
            held.log,
            **{
                GROUP: held.group,
                REASON: reason,
                DEAD_AT: time.time(),
                ORIGINAL: held.message.message_id or "",
            },
        )
        await self._publish(self._names.dead_exchange, held.channel, message, held.channel)
        await held.message.ack()
        self._count(held.channel, "dead_lettered")
        self._freed(held.channel)
        self._event(held.channel, "dead_lettered", held.message.message_id or "", held.consumer)

    async def _expire_held(self, spec: ChannelSpec, group: str | None) -> int:
        """Give back what was held past the ack timeout (or dead-letter it, last attempt; or
        drop it, past its TTL). Returns how many expired."""
        now = time.time()
        expired = 0
        for key, held in list(self._held.items()):
            late = now - held.held_at > spec.ack_timeout_seconds
            if held.channel != spec.name or (group and held.group != group) or not late:
                continue
            if not self._claim(key, held):
                continue
            if now - held.envelope.received_at > spec.ttl_seconds:
                await held.message.ack()
                self._count(spec.name, "expired")
                self._freed(spec.name)
                expired += 1
                continue
            await self._log(held, ACK_TIMEOUT)
            if held.attempt >= spec.max_delivery_attempts:
                await self._dead_letter(held, "max_delivery_attempts")
            else:
                await self._give_back(held, self._names.group_queue(spec.name, held.group))
        return expired

    async def _expire_queue(self, spec: ChannelSpec, group: str) -> int:
        """Drop (and count) the expired messages at the head of a group's queue. The first
        live one goes back when the scratch channel closes: a quorum queue serves returned
        messages first, so the order holds."""
        scratch = await self._scratch()
        expired = 0
        try:
            queue = await scratch.get_queue(self._names.group_queue(spec.name, group))
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                meta = _text((message.headers or {})[META]).encode()
                if time.time() - Envelope.decode(meta, b"").received_at <= spec.ttl_seconds:
                    break
                await message.ack()
                expired += 1
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
        finally:
            await self._close(scratch)
        self._count(spec.name, "expired", expired)
        if expired:
            self._freed(spec.name)
        return expired

    async def release(self, channel: str, group: str, consumer: str) -> int:
        mine = [
            (k, h)
            for k, h in self._held.items()
            if (h.channel, h.group, h.consumer) == (channel, group, consumer)
        ]
        # Shielded: the caller is often a connection being torn down (cancelled).
        return await asyncio.shield(self._release(channel, group, consumer, mine))

    async def _release(
        self, channel: str, group: str, consumer: str, mine: list[tuple[str, Held]]
    ) -> int:
        released = 0
        for key, held in mine:
            if not self._claim(key, held):
                continue
            await self._log(held, CONNECTION_CLOSED)
            await self._give_back(held, self._names.group_queue(channel, group))
            released += 1
        # The companion holds nothing, but records that the group was alive until now.
        await self._registry.release(channel, group, consumer)
        return released

    async def pending_count(self, channel: str, group: str, consumer: str, limit: int) -> int:
        n = sum(
            1
            for h in self._held.values()
            if (h.channel, h.group, h.consumer) == (channel, group, consumer)
        )
        return min(n, limit)

    async def housekeep(self, channel: str) -> int:
        """Ack timeouts of this replica, and expiry (counted) at the head of each group's
        queue; the broker's ``x-message-ttl`` is only the backstop when no replica runs."""
        spec = await self._registry.get_channel(channel)
        if spec is None:
            return 0
        expired = await self._expire_held(spec, None)
        for info in await self._registry.list_groups(channel):
            expired += await self._expire_queue(spec, info.name)
        return expired

    def wake(self, channel: str) -> None:
        self._notifier.notify(channel)

    def change_version(self, channel: str) -> int:
        return self._notifier.version(channel)

    async def wait_for_change(self, channel: str, since: int, max_wait: float) -> None:
        await self._notifier.wait(channel, since, max_wait)

    async def _browse(
        self, channel: str, settle: Any = None, limit: int = 1_000_000
    ) -> list[DeadLetter]:
        """Read the dead-letter queue; ``settle(letter, message)`` may ack one. Closing the
        scratch channel gives the rest back to the broker, in their order."""
        if await self._registry.get_channel(channel) is None:
            return []
        scratch = await self._scratch()
        letters: list[DeadLetter] = []
        try:
            queue = await scratch.declare_queue(self._names.dead_queue(channel), durable=True)
            while len(letters) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                headers = message.headers or {}
                letter = DeadLetter(
                    message.message_id or "",
                    _text(headers.get(ORIGINAL, "")),
                    _text(headers.get(GROUP, DEFAULT_GROUP)),
                    _text(headers.get(REASON, "")),
                    int(_number(headers.get(ATTEMPTS))),
                    _number(headers.get(DEAD_AT)),
                    Envelope.decode(_text(headers[META]).encode(), message.body),
                    decode_attempts(_text(headers.get(LOG, "[]")).encode()),
                )
                letters.append(letter)
                if settle is not None:
                    await settle(letter, message)
        except aiormq.exceptions.AMQPError as exc:
            raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
        finally:
            await self._close(scratch)
        return letters

    async def dead_letters(self, channel: str, limit: int = 100) -> list[DeadLetter]:
        return await self._browse(channel, limit=limit)

    async def replay_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        replayed = 0

        async def settle(letter: DeadLetter, message: AbstractIncomingMessage) -> None:
            nonlocal replayed
            if ids is not None and letter.dead_letter_id not in ids:
                return
            if await self._registry.has_group(channel, letter.group):
                fresh = self._message(letter.envelope, uuid.uuid4().hex, 0, [])
                await self._publish(
                    "", self._names.group_queue(channel, letter.group), fresh, channel
                )
                replayed += 1
            await message.ack()

        await self._browse(channel, settle)
        self._forget_channel(channel)
        if replayed:
            self._notifier.notify(channel)
        return replayed

    async def purge_dead_letters(self, channel: str, ids: list[str] | None = None) -> int:
        purged = 0

        async def settle(letter: DeadLetter, message: AbstractIncomingMessage) -> None:
            nonlocal purged
            if ids is None or letter.dead_letter_id in ids:
                await message.ack()
                purged += 1

        await self._browse(channel, settle)
        return purged

    async def replay_history(
        self, channel: str, group: str, since: float, limit: int = 10000
    ) -> int:
        """Not kept: a queue forgets what was acked (docs/STORAGE-RABBITMQ.md)."""
        return 0

    async def _queue_depth(self, name: str) -> int:
        """Ready messages of a queue (0 if it does not exist)."""
        try:
            query = await self._open_query()
            declared = await query.queue_declare(name, passive=True, timeout=CONNECT_TIMEOUT)
            return int(declared.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0  # the broker closed the query channel: the next query opens another
        except (TimeoutError, OSError, RuntimeError, aiormq.exceptions.AMQPError) as exc:
            raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc

    async def _oldest(self, channel: str, group: str) -> float | None:
        """When the group's oldest message not acked was received: the heads of its queues
        (looked at and given back) and what this replica holds."""
        times = [
            h.envelope.received_at
            for h in self._held.values()
            if (h.channel, h.group) == (channel, group)
        ]
        for name in (
            self._names.group_queue(channel, group),
            self._names.retry_queue(channel, group),
        ):
            scratch = await self._scratch()
            try:
                queue = await scratch.get_queue(name)
                message = await queue.get(no_ack=False, fail=False)
                if message is not None:
                    meta = _text((message.headers or {})[META]).encode()
                    times.append(Envelope.decode(meta, b"").received_at)
            except aiormq.exceptions.ChannelNotFoundEntity:
                pass
            except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                raise StorageUnavailable(f"rabbitmq: {exc!r}") from exc
            finally:
                await self._close(scratch)
        return min(times) if times else None

    async def _backlog(self, channel: str, group: str) -> tuple[int, int]:
        """(backlog, in flight) of a group: ready and retrying in the broker, held here."""
        held = sum(1 for h in self._held.values() if (h.channel, h.group) == (channel, group))
        retrying = await self._queue_depth(self._names.retry_queue(channel, group))
        ready = await self._queue_depth(self._names.group_queue(channel, group))
        return ready + retrying + held, retrying + held

    async def stats(self, channel: str) -> ChannelStats:
        await self._spec(channel)
        depth = in_flight = 0
        oldest: list[float] = []
        for info in await self._registry.list_groups(channel):
            backlog, flying = await self._backlog(channel, info.name)
            depth, in_flight = max(depth, backlog), in_flight + flying
            received = await self._oldest(channel, info.name) if backlog else None
            oldest += [] if received is None else [received]
        counters = self._counters.get(channel, Counter())
        return ChannelStats(
            depth=depth,
            in_flight=in_flight,
            dead_letters=await self._queue_depth(self._names.dead_queue(channel)),
            oldest_age_seconds=max(0.0, time.time() - min(oldest)) if oldest else None,
            counters={name: counters[name] for name in COUNTERS},
        )

    async def recent_events(self, channel: str, limit: int = 50) -> list[ChannelEvent]:
        return list(self._events.get(channel, ()))[:limit]

    # Registry: the companion store, with the broker's queues kept in step ------------------

    async def provision(self, spec: ChannelSpec) -> None:
        await self._registry.provision(spec)
        self._forget_channel(spec.name)
        groups = [g.name for g in await self._registry.list_groups(spec.name)]
        await self._declare(spec, groups or [DEFAULT_GROUP])
        # A provisioned channel takes webhooks at once (docs/STORAGE-RABBITMQ.md, "A new
        # queue"); a group joined later instead holds back the first appends after it.
        await self._until_registered(spec.name)

    async def get_channel(self, name: str) -> ChannelSpec | None:
        return await self._registry.get_channel(name)

    async def list_channels(self) -> list[ChannelSpec]:
        return await self._registry.list_channels()

    async def delete_channel(self, name: str) -> bool:
        groups = [g.name for g in await self._registry.list_groups(name)]
        if not await self._registry.delete_channel(name):
            return False
        self._forget_channel(name)
        for group in groups:
            await self._delete_queues(name, group)
        scratch = await self._scratch()
        try:
            await scratch.queue_delete(self._names.dead_queue(name))
            await scratch.exchange_delete(self._names.exchange(name))
        finally:
            await self._close(scratch)
        self._declared = {d for d in self._declared if not d.startswith(f"{name}/")}
        return True

    async def _delete_queues(self, channel: str, group: str) -> None:
        self._forget_channel(channel)
        for key, held in list(self._held.items()):
            if (held.channel, held.group) == (channel, group):
                del self._held[key]
        scratch = await self._scratch()
        try:
            await scratch.queue_delete(self._names.group_queue(channel, group))
            await scratch.queue_delete(self._names.retry_queue(channel, group))
        finally:
            await self._close(scratch)
        self._declared.discard(f"{channel}/{group}")

    async def put_token(self, token: TokenRecord) -> None:
        await self._registry.put_token(token)

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        return await self._registry.find_token(token_hash)

    async def list_tokens(self, channel: str) -> list[TokenRecord]:
        return await self._registry.list_tokens(channel)

    async def delete_token(self, channel: str, token_id: str) -> bool:
        return await self._registry.delete_token(channel, token_id)

    async def join(self, channel: str, group: str) -> None:
        await self._registry.join(channel, group)
        self._forget_channel(channel)
        await self._declare(await self._spec(channel), [group])

    async def has_group(self, channel: str, group: str) -> bool:
        return await self._registry.has_group(channel, group)

    async def list_groups(self, channel: str) -> list[GroupInfo]:
        """The companion's groups with the broker's backlog."""
        groups = []
        for info in await self._registry.list_groups(channel):
            backlog, in_flight = await self._backlog(channel, info.name)
            oldest = await self._oldest(channel, info.name) if backlog else None
            age = None if oldest is None else max(0.0, time.time() - oldest)
            groups.append(
                replace(info, backlog=backlog, in_flight=in_flight, oldest_age_seconds=age)
            )
        return groups

    async def drop_group(self, channel: str, group: str) -> int | None:
        removed = await self._registry.drop_group(channel, group)
        if removed is None:
            return None
        await self._delete_queues(channel, group)
        if group == DEFAULT_GROUP:
            await self._declare(await self._spec(channel), [DEFAULT_GROUP])
        return removed

    async def drop_idle_groups(self, channel: str) -> list[str]:
        dropped = await self._registry.drop_idle_groups(channel)
        for group in dropped:
            await self._delete_queues(channel, group)
        return dropped

    async def add_connection(self, record: ConnectionRecord, limit: int) -> bool:
        return await self._registry.add_connection(record, limit)

    async def touch_connection(self, channel: str, connection_id: str) -> bool:
        return await self._registry.touch_connection(channel, connection_id)

    async def remove_connection(self, channel: str, connection_id: str) -> bool:
        return await self._registry.remove_connection(channel, connection_id)

    async def get_connection(self, channel: str, connection_id: str) -> ConnectionRecord | None:
        record = await self._registry.get_connection(channel, connection_id)
        if record is None:
            return None
        return replace(record, delivered=self._acked_by[(channel, connection_id)])

    async def list_connections(self, channel: str) -> list[ConnectionRecord]:
        return [
            replace(r, delivered=self._acked_by[(channel, r.connection_id)])
            for r in await self._registry.list_connections(channel)
        ]

    async def reap_connections(self, channel: str) -> int:
        """Reap in the companion; what the reaped held here goes back to their groups."""
        before = {r.connection_id: r.group for r in await self._registry.list_connections(channel)}
        reaped = await self._registry.reap_connections(channel)
        if reaped:
            alive = {r.connection_id for r in await self._registry.list_connections(channel)}
            for connection_id, group in before.items():
                if connection_id not in alive:
                    await self.release(channel, group, connection_id)
        return reaped

    # Limits -------------------------------------------------------------------------------

    async def remember(self, key: str, ttl_seconds: float) -> bool:
        return await self._registry.remember(key, ttl_seconds)

    async def hit_rate(self, channel: str, key: str, limit: int, window_seconds: float) -> float:
        return await self._registry.hit_rate(channel, key, limit, window_seconds)

    # Lifecycle ----------------------------------------------------------------------------

    async def ping(self) -> None:
        """The companion store answers, and the broker takes publishes: the last publish (a
        webhook's or a probe's) went through less than ``READY_FRESH`` ago, or a probe does
        now; one that failed answers 503 for ``FAILURE_KEPT`` without asking again. Concurrent
        calls share one probe, and none waits for it longer than ``PROBE_TIMEOUT``."""
        await self._registry.ping()
        ready = self._publishes.is_ready(time.monotonic())
        if ready is None:
            if self._probing is None or self._probing.done():
                self._probing = asyncio.ensure_future(self._probe())
                # Its outcome is in ``_publishes``; the exception needs no other reader.
                self._probing.add_done_callback(lambda done: done.cancelled() or done.exception())
            with contextlib.suppress(StorageUnavailable, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._probing), PROBE_TIMEOUT)
            if not self._probing.done():  # a channel open the broker does not answer
                why = f"rabbitmq: a probe publish was not confirmed within {PROBE_TIMEOUT:g} s"
                self._publishes.failed(time.monotonic(), why)
            ready = self._publishes.is_ready(time.monotonic())
        if not ready:
            raise StorageUnavailable(self._publishes.failure or "rabbitmq: not ready")

    async def _probe(self) -> None:
        """A confirmed publish on the channel ingest publishes on, to a queue of its own; the
        channel that holds the deliveries opened on the way (reads and acks need it)."""
        try:
            await self._open()
            if self._names.probe_queue not in self._declared:
                await self._declare_queue(self._names.probe_queue, PROBE_ARGUMENTS)
                self._declared.add(self._names.probe_queue)
        except StorageUnavailable as exc:
            self._publishes.failed(time.monotonic(), str(exc))
            raise
        probe = Outgoing(b"", PublishedProperties(delivery_mode=PERSISTENT))
        await self._publish("", self._names.probe_queue, probe, "", confirm_within=PROBE_TIMEOUT)

    async def aclose(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
        try:
            if self._connection is not None and not self._connection.is_closed:
                await self._connection.close()
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            raise StorageError(f"rabbitmq: {exc!r}") from exc
        finally:
            self._connection = None
            self._channel = self._publisher = self._query = None
            self._rooms.clear()
            await self._registry.aclose()
