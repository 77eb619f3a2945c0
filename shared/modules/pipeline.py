"""Deliver a message by its webhook's plan: one module or a chain, with retries and timeouts.

The verdict decides the ack: delivered only when every step has succeeded. A step that still
fails after its retries makes the message come back later (a nack with retry) if any failure
was transient, and go to the dead letters if every failure was permanent. Steps that already
succeeded for a message are remembered (in this process), so a redelivery runs only the rest.
``continue_on_error`` decides only whether a sequential chain goes on after a failed step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook_connect.shared.config.delivery import DeliveryPlan, Step
from webhook_connect.shared.modules.base import (
    DeliveryError,
    Message,
    Module,
    Permanent,
    Pools,
    Transient,
)
from webhook_connect.shared.modules.registry import module_class
from webhook_connect.shared.modules.transform import transform_message
from webhook_connect.shared.policy import retry_delay

logger = logging.getLogger("webhook_connect.modules")

# Messages whose completed steps are remembered for a redelivery.
REMEMBERED = 10_000


@dataclass(frozen=True, slots=True)
class StepFailure:
    module: str
    error: DeliveryError


@dataclass(frozen=True, slots=True)
class Verdict:
    """How delivering one message went."""

    delivered: bool
    retry: bool = False
    failures: tuple[StepFailure, ...] = ()
    target: str = ""
    attempts: int = 0
    seconds: float = 0.0

    @property
    def reason(self) -> str:
        """Short reason for a nack: the first failing module and its error."""
        if not self.failures:
            return ""
        first = self.failures[0]
        return f"{first.module}: {first.error}"[:200]


@dataclass
class _Runner:
    """One step with its module instance."""

    step: Step
    module: Module[Any]


@dataclass
class _Pipeline:
    plan: DeliveryPlan
    runners: list[_Runner]
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = "+".join(r.step.module for r in self.runners)


class Dispatcher:
    """The modules of every configured webhook, set up once and shared by all deliveries."""

    def __init__(self, plans: Mapping[str, DeliveryPlan], *, sleep: Any = asyncio.sleep) -> None:
        self.pools = Pools()
        self._sleep = sleep
        self._pipelines = {
            webhook_id: _Pipeline(plan, [self._runner(step) for step in plan.steps])
            for webhook_id, plan in plans.items()
        }
        self._done: collections.OrderedDict[str, set[int]] = collections.OrderedDict()

    def _runner(self, step: Step) -> _Runner:
        cls = module_class(step.module)
        return _Runner(step, cls(step.config, step.connection, self.pools))

    def knows(self, webhook_id: str) -> bool:
        return webhook_id in self._pipelines or "*" in self._pipelines

    async def start(self) -> None:
        """Set every module up; a server that is down now is retried at delivery."""
        for pipeline in self._pipelines.values():
            for runner in pipeline.runners:
                try:
                    await runner.module.start()
                except DeliveryError as exc:
                    logger.warning("module %s not ready yet: %s", runner.step.module, exc)

    async def aclose(self) -> None:
        for pipeline in self._pipelines.values():
            for runner in pipeline.runners:
                try:
                    await runner.module.aclose()
                except Exception:  # closing the rest matters more
                    logger.warning("closing module %s failed", runner.step.module, exc_info=True)
        await self.pools.aclose()

    async def deliver(self, message: Message) -> Verdict:
        started = time.monotonic()
        pipeline = self._pipelines.get(message.webhook_id) or self._pipelines.get("*")
        if pipeline is None:
            error = Permanent(f"no module configured for webhook {message.webhook_id!r}")
            return Verdict(False, False, (StepFailure("-", error),), "-")
        done = self._done.get(message.message_id, set())
        pending = [i for i in range(len(pipeline.runners)) if i not in done]
        failures: list[StepFailure] = []
        tries = 0

        async def run(index: int) -> None:
            nonlocal tries
            runner = pipeline.runners[index]
            error, used = await self._run_step(runner, message)
            tries += used
            if error is None:
                done.add(index)
            else:
                failures.append(StepFailure(runner.step.module, error))

        if pipeline.plan.execution == "parallel":
            await asyncio.gather(*(run(i) for i in pending))
        else:
            for index in pending:
                await run(index)
                if failures and not pipeline.plan.continue_on_error:
                    break
        seconds = time.monotonic() - started
        if not failures:
            self._done.pop(message.message_id, None)
            return Verdict(True, target=pipeline.name, attempts=tries, seconds=seconds)
        self._remember(message.message_id, done)
        retry = any(f.error.retry for f in failures)
        return Verdict(False, retry, tuple(failures), pipeline.name, tries, seconds)

    async def _run_step(
        self, runner: _Runner, message: Message
    ) -> tuple[DeliveryError | None, int]:
        """Deliver through one module with its retries; the last error, and the tries used."""
        step = runner.step
        attempts = step.retry.max_attempts if step.retry.enabled else 1
        error: DeliveryError | None = None
        attempt = 0
        while attempt < attempts:
            attempt += 1
            try:
                shaped = message
                if step.transform is not None:
                    shaped = transform_message(step.transform, message)
                async with asyncio.timeout(step.timeout_seconds):  # no task per call
                    await runner.module.deliver(shaped)
                return None, attempt
            except TimeoutError:
                error = Transient(f"no confirmation within {step.timeout_seconds:g}s")
            except DeliveryError as exc:
                error = exc
            except Exception as exc:  # a driver's surprise is a failed attempt, not a crash
                logger.exception("module %s failed unexpectedly", step.module)
                error = Transient(f"{type(exc).__name__}: {exc}")
            if not error.retry or attempt == attempts:
                break
            await self._sleep(
                retry_delay(
                    attempt,
                    initial=step.retry.initial_delay,
                    multiplier=step.retry.backoff_multiplier,
                    maximum=step.retry.max_delay,
                )
            )
        return error, attempt

    def _remember(self, message_id: str, done: set[int]) -> None:
        if not done:
            return
        self._done[message_id] = done
        self._done.move_to_end(message_id)
        while len(self._done) > REMEMBERED:
            self._done.popitem(last=False)
