"""Chains, retries and transforms (shared/modules/pipeline.py), with modules that record.

The recording module is wiring only: what each real module writes is tested against its
server in the other files here; this file holds the chain rules to account.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import orjson
import pytest
from pydantic import BaseModel, ConfigDict

from webhook_connect.shared.config.delivery import TransformConfig, build_plan
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules import MODULES, Message, Module, Permanent, Transient
from webhook_connect.shared.modules.pipeline import Dispatcher
from webhook_connect.shared.modules.transform import transform

WRITES: list[tuple[str, bytes]] = []


class RecorderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    fail: list[str] = []  # "transient" / "permanent", one per call, then success


class Recorder(Module[RecorderConfig]):
    name = "recorder"
    Config: ClassVar[type[BaseModel]] = RecorderConfig
    calls: ClassVar[dict[str, int]] = {}

    async def deliver(self, message: Message) -> None:
        n = Recorder.calls.get(self.config.name, 0)
        Recorder.calls[self.config.name] = n + 1
        if n < len(self.config.fail):
            kind = self.config.fail[n]
            raise (Transient if kind == "transient" else Permanent)(f"{kind} #{n + 1}")
        WRITES.append((self.config.name, message.body))


@pytest.fixture(autouse=True)
def recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODULES, "recorder", (f"{__name__}:Recorder", None))
    WRITES.clear()
    Recorder.calls.clear()


def step(name: str, *fail: str, **extra: Any) -> dict[str, Any]:
    return {"module": "recorder", "module-config": {"name": name, "fail": list(fail)}, **extra}


def message(body: bytes = b'{"a": {"b": 1}, "c": 2}', message_id: str = "1-1") -> Message:
    envelope = Envelope("dev", "hook", time.time(), "POST", "/webhook/hook", "", (), body)
    return Message.of(message_id, 1, envelope)


async def deliver(entry: dict[str, Any], *messages: Message) -> list[Any]:
    fast = {"retry": {"max_attempts": 2, "initial_delay": 0}, **entry}
    dispatcher = Dispatcher({"hook": build_plan(fast, "webhooks.json", "hook", {})})
    await dispatcher.start()
    try:
        return [await dispatcher.deliver(m) for m in messages or (message(),)]
    finally:
        await dispatcher.aclose()


async def test_a_transient_failure_is_retried_within_the_attempt() -> None:
    [verdict] = await deliver(step("a", "transient"))
    assert verdict.delivered and verdict.attempts == 2
    assert WRITES == [("a", message().body)]


async def test_a_permanent_failure_is_not_retried_and_dead_letters() -> None:
    [verdict] = await deliver(step("a", "permanent", "permanent"))
    assert (verdict.delivered, verdict.retry, verdict.attempts) == (False, False, 1)
    assert verdict.reason == "recorder: permanent #1"


async def test_a_sequential_chain_stops_at_a_failure_without_continue_on_error() -> None:
    entry = {
        "chain": [step("a"), step("b", "transient", "transient"), step("c")],
        "chain-config": {"execution": "sequential", "continue_on_error": False},
    }
    [verdict] = await deliver(entry)
    assert (verdict.delivered, verdict.retry) == (False, True)
    assert [name for name, _ in WRITES] == ["a"]


async def test_continue_on_error_runs_the_rest_and_a_redelivery_runs_only_what_failed() -> None:
    entry = {"chain": [step("a"), step("b", "transient", "transient"), step("c")]}
    first, second = await deliver(entry, message(), message())
    assert (first.delivered, first.retry) == (False, True)
    assert second.delivered
    # a and c wrote once: the redelivery ran b alone.
    assert [name for name, _ in WRITES] == ["a", "c", "b"]


async def test_a_parallel_chain_runs_every_module() -> None:
    entry = {"chain": [step("a"), step("b"), step("c")], "chain-config": {"execution": "parallel"}}
    [verdict] = await deliver(entry)
    assert verdict.delivered
    assert sorted(name for name, _ in WRITES) == ["a", "b", "c"]


async def test_a_mix_of_permanent_and_transient_failures_comes_back() -> None:
    entry = {"chain": [step("a", "permanent"), step("b", "transient", "transient")]}
    [verdict] = await deliver(entry)
    assert (verdict.delivered, verdict.retry) == (False, True)


async def test_each_step_gets_its_own_transform() -> None:
    entry = {
        "chain": [
            step("raw"),
            step(
                "shaped",
                transform={
                    "pick": ["a.b"],
                    "rename": {"a.b": "id"},
                    "add": {"source": "shop"},
                    "wrap": "event",
                },
            ),
        ]
    }
    [verdict] = await deliver(entry)
    assert verdict.delivered
    assert dict(WRITES) == {
        "raw": message().body,
        "shaped": orjson.dumps({"event": {"a": {}, "id": 1, "source": "shop"}}),
    }


async def test_a_transform_of_a_body_that_is_not_a_json_object_dead_letters() -> None:
    [verdict] = await deliver(step("a", transform={"wrap": "x"}), message(b"\xff\x00"))
    assert (verdict.delivered, verdict.retry) == (False, False)
    assert "not JSON" in verdict.reason


async def test_an_unknown_webhook_dead_letters_unless_a_wildcard_takes_it() -> None:
    dispatcher = Dispatcher({"other": build_plan(step("a"), "w.json", "other", {})})
    verdict = await dispatcher.deliver(message())
    assert (verdict.delivered, verdict.retry) == (False, False)
    assert "no module configured for webhook 'hook'" in verdict.reason
    dispatcher = Dispatcher({"*": build_plan(step("a"), "w.json", "*", {})})
    assert (await dispatcher.deliver(message())).delivered


def test_transform_rules() -> None:
    payload = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    assert transform(TransformConfig(pick=("a.c", "d", "missing")), payload) == {
        "a": {"c": [1, 2]},
        "d": "x",
    }
    assert transform(TransformConfig(rename={"a.b": "b", "zz": "y"}), payload) == {
        "a": {"c": [1, 2]},
        "d": "x",
        "b": 1,
    }
    assert transform(TransformConfig(add={"meta.source": "shop"}, wrap="data"), {"d": 1}) == {
        "data": {"d": 1, "meta": {"source": "shop"}}
    }
    assert payload == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}, "the input is never changed"
