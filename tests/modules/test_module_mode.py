"""Module mode end to end: a real cloud, a real connector process delivering through modules,
and the cloud delivering directly; what lands on disk and at a real HTTP sink is checked."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Cloud, ConnectorProcess, Sink, free_port, running, wait_until

TOKEN = "module-mode-token-0123"
ADMIN = "admin-token-0123456789"
EVERY_BYTE = bytes(range(256))
CHANNEL = {"channel": "dev", "channel_token": TOKEN, "retry_delay_seconds": 0.2}
REJECTING_PORT = free_port()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modules")


@pytest.fixture(scope="module")
def rejecting(workdir: Path) -> Iterator[Sink]:
    with running(Sink(workdir, status=400, port=REJECTING_PORT)) as sink:
        yield sink


@pytest.fixture(scope="module")
def cloud(workdir: Path, rejecting: Sink) -> Iterator[Cloud]:
    webhooks = {
        "orders": {"module": "webhook_connect", "module-config": CHANNEL},
        "files": {"module": "webhook_connect", "data_type": "blob", "module-config": CHANNEL},
        # Delivered by the cloud itself:
        "archive": {
            "module": "save_to_disk",
            "data_type": "blob",
            "module-config": {"path": str(workdir / "archive"), "file_extension": ".bin"},
        },
        "bounce": {
            "module": "http_webhook",
            "retry": {"max_attempts": 1},
            "module-config": {"url": rejecting.url, "allowed_hosts": ["127.0.0.1"]},
        },
    }
    path = workdir / "webhooks.json"
    path.write_text(json.dumps(webhooks))
    storage = f"sqlite:///{workdir / 'buffer.db'}"
    with running(Cloud(storage, path, workdir, "--admin-token", ADMIN)) as server:
        yield server


@pytest.fixture
def connector(cloud: Cloud, tmp_path: Path) -> Iterator[Any]:
    started: list[ConnectorProcess] = []

    def start(hooks: dict[str, Any]) -> ConnectorProcess:
        (tmp_path / "hooks.json").write_text(json.dumps(hooks))
        settings = {
            "cloud_url": cloud.url,
            "channel": "dev",
            "token": TOKEN,
            "connector_id": "on-prem",
            "state_dir": str(tmp_path / "state"),
            "webhooks_config": "hooks.json",
        }
        process = ConnectorProcess(tmp_path, settings)
        started.append(process)
        process.start()
        wait_until(lambda: "connected to" in process.output(), 20, "the connector to connect")
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL)


def post(cloud: Cloud, webhook: str, body: bytes) -> str:
    answer = httpx.post(f"{cloud.url}/webhook/{webhook}", content=body, timeout=10)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["message_id"])


def disk(path: Path, name: str = "{message_id}") -> dict[str, Any]:
    return {
        "module": "save_to_disk",
        "module-config": {"path": str(path), "filename_pattern": name, "file_extension": ".bin"},
    }


def forward(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "module": "http_webhook",
        "module-config": {"url": url, "allowed_hosts": ["127.0.0.1"]},
        **extra,
    }


def sink_bodies(sink: Sink) -> list[bytes]:
    import base64

    return [base64.b64decode(str(r["body_b64"])) for r in sink.records()]


def test_a_chain_delivers_byte_exact_and_transformed(
    cloud: Cloud, connector: Any, tmp_path: Path
) -> None:
    with running(Sink(tmp_path)) as sink:
        shaped = forward(sink.url, transform={"pick": ["order.id"], "wrap": "event"})
        connector(
            {
                "orders": {
                    "chain": [disk(tmp_path / "a"), shaped],
                    "chain-config": {"execution": "parallel"},
                },
                "*": disk(tmp_path / "b"),
            }
        )
        body = b'{"order": {"id": 7, "total": "9.99"}, "note": "caf\xc3\xa9"}'
        order = post(cloud, "orders", body)
        blob = post(cloud, "files", EVERY_BYTE)
        wait_until(lambda: (tmp_path / "a" / f"{order}.bin").exists(), 20, "the order on disk")
        wait_until(lambda: (tmp_path / "b" / f"{blob}.bin").exists(), 20, "the blob on disk")
        wait_until(lambda: sink_bodies(sink), 20, "the forwarded order")
    assert (tmp_path / "a" / f"{order}.bin").read_bytes() == body
    assert (tmp_path / "b" / f"{blob}.bin").read_bytes() == EVERY_BYTE
    assert [json.loads(b) for b in sink_bodies(sink)] == [{"event": {"order": {"id": 7}}}]


def test_a_module_whose_server_is_down_is_retried_until_it_is_back(
    cloud: Cloud, connector: Any, tmp_path: Path
) -> None:
    port = free_port()
    process = connector(
        {
            "orders": {
                "chain": [
                    disk(tmp_path / "once", "{uuid}"),
                    forward(f"http://127.0.0.1:{port}/", retry={"max_attempts": 1}),
                ]
            },
        }
    )
    post(cloud, "orders", b'{"n": 1}')
    wait_until(lambda: "retry" in process.output(), 20, "a failed attempt")
    with running(Sink(tmp_path, port=port)) as sink:
        wait_until(lambda: sink_bodies(sink) == [b'{"n": 1}'], 30, "delivery once it is back")
    # The disk step succeeded at once; the redeliveries ran only the failed step.
    assert len(list((tmp_path / "once").iterdir())) == 1


def test_a_module_that_rejects_dead_letters_with_its_reason(
    cloud: Cloud, connector: Any, rejecting: Sink
) -> None:
    connector({"orders": forward(rejecting.url)})
    message_id = post(cloud, "orders", b'{"bad": true}')
    letter = wait_for_dead_letter(cloud, "dev", message_id)
    assert letter["reason"] == "http_webhook: http_400"
    [attempt] = letter["delivery_attempts"]
    assert attempt["connector_id"] == "on-prem"


def test_the_cloud_delivers_directly_from_storage(cloud: Cloud, workdir: Path) -> None:
    message_id = post(cloud, "archive", EVERY_BYTE)
    stored = workdir / "archive" / f"archive-{message_id}.bin"
    wait_until(stored.exists, 20, "the archived file")
    assert stored.read_bytes() == EVERY_BYTE
    rejected = post(cloud, "bounce", b'{"x": 1}')
    letter = wait_for_dead_letter(cloud, "_direct.bounce", rejected)
    assert letter["reason"] == "http_webhook: http_400"


def wait_for_dead_letter(cloud: Cloud, channel: str, message_id: str) -> dict[str, Any]:
    url = f"{cloud.url}/admin/channels/{channel}/dead-letters/{message_id}"
    headers = {"Authorization": f"Bearer {ADMIN}"}
    wait_until(lambda: httpx.get(url, headers=headers).status_code == 200, 20, "a dead letter")
    answer: dict[str, Any] = httpx.get(url, headers=headers).json()
    return answer
