"""Routing and filtering end to end: a real cloud, the real connector, real sinks.

Routes are tried in order (first match wins), the rest go to default_target; with no fallback a
message is acked and counted, or dead-lettered with reason ``unmatched``; ``--events`` keeps
only the named events. Bad routes stop start-up with one line and exit 2, before dialling.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import standardwebhooks

from tests.servers import REPO, Cloud, ConnectorProcess, Sink, free_port, running, wait_until
from webhook_connect.cloud.buffers import open_buffer

TOKEN = "routes-token-0123456789"
CHANNEL = {
    "channel": "dev",
    "channel_token": TOKEN,
    "ack_timeout_seconds": 5,
    "retry_delay_seconds": 0.2,
    "max_delivery_attempts": 3,
}
WEBHOOKS = {
    name: {"module": "webhook_connect", "module-config": CHANNEL}
    for name in ("github", "github-enterprise", "stripe", "other")
}
SIGN_SECRET = "whsec_" + base64.b64encode(b"routes-sign-secret-0123456789ab").decode()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    """A cloud of this test's own (SQLite): messages left by one test never reach another."""
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    with running(Cloud(f"sqlite:///{tmp_path / 'buffer.db'}", path, tmp_path)) as server:
        yield server


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[list[Sink]]:
    """Three sinks: two route targets and the default target."""
    started: list[Sink] = []
    try:
        for _ in range(3):
            sink = Sink(tmp_path)
            started.append(sink)
            sink.start()
        yield started
    finally:
        for sink in started:
            sink.stop()


def settings(cloud: Cloud, workdir: Path, **extra: object) -> dict[str, object]:
    return {
        "cloud_url": cloud.url,
        "channel": "dev",
        "token": TOKEN,
        "connector_id": "routes-connector",
        "state_dir": str(workdir / "state"),
        "reconnect_delay_seconds": 0.2,
        **extra,
    }


def target(sink: Sink, **extra: object) -> dict[str, object]:
    return {"url": sink.url, "timeout_seconds": 5, "retry_max_attempts": 1, **extra}


@pytest.fixture
def connector(tmp_path: Path) -> Iterator[list[ConnectorProcess]]:
    started: list[ConnectorProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop(signal.SIGKILL)


def start(
    started: list[ConnectorProcess],
    workdir: Path,
    config: dict[str, object],
    *flags: str,
    name: str = "connector",
) -> ConnectorProcess:
    process = ConnectorProcess(workdir, config, name)
    started.append(process)
    process.start(*flags)
    wait_until(lambda: "connected to" in process.output(), 20, "the connector to connect")
    return process


def post(cloud: Cloud, webhook: str, body: object, **headers: str) -> str:
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    answer = httpx.post(
        f"{cloud.url}/webhook/{webhook}",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **sent},
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["message_id"])


def ids_at(sink: Sink) -> list[str]:
    found = []
    for record in sink.records():
        headers = {str(k).lower(): str(v) for k, v in record["headers"]}  # type: ignore[union-attr]
        found.append(headers["x-webhook-connect-message-id"])
    return found


def dead_letters(cloud: Cloud) -> list[tuple[str, str]]:
    async def read() -> list[tuple[str, str]]:
        store = open_buffer(cloud.storage)
        try:
            return [(d.message_id, d.reason) for d in await store.dead_letters("dev")]
        finally:
            await store.aclose()

    return asyncio.run(read())


def test_first_matching_route_takes_the_message_and_the_rest_go_to_default_target(
    cloud: Cloud, sinks: list[Sink], connector: list[ConnectorProcess], tmp_path: Path
) -> None:
    pulls, charges, default = sinks
    routes = [
        {
            "match": {
                "webhook": "github*",
                "header": {"x-github-event": "pull_request*"},
                "json": {"$.action": "opened", "$.pull_request['base ref']": "ma?n"},
            },
            "target": target(pulls, sign={"secret": SIGN_SECRET}),
        },
        {
            "_comment": "keys starting with _ are comments, as elsewhere in connector.json",
            "match": {"json": {"$.type": "charge.*", "$.livemode": False}},
            "target": target(charges),
        },
        {"match": {"webhook": "github*"}, "target": target(default, headers={"X-Route": "2"})},
    ]
    config = settings(cloud, tmp_path, routes=routes, default_target=target(default))
    start(connector, tmp_path, config)
    opened = {"action": "opened", "pull_request": {"base ref": "main"}}
    to_pulls = [
        post(cloud, "github", opened, X_GitHub_Event="pull_request"),
        post(cloud, "github-enterprise", opened, X_GitHub_Event="pull_request_review"),
    ]
    to_charges = [post(cloud, "stripe", {"type": "charge.succeeded", "livemode": False})]
    to_route_2 = [
        post(cloud, "github", {**opened, "action": "closed"}, X_GitHub_Event="pull_request"),
        post(cloud, "github", opened, X_GitHub_Event="push"),
    ]
    to_default = [
        post(cloud, "stripe", {"type": "charge.succeeded", "livemode": True}),
        post(cloud, "stripe", {"type": "invoice.paid"}),
        post(cloud, "other", [1, 2, 3]),
    ]
    everything = len(to_pulls) + len(to_charges) + len(to_route_2) + len(to_default)
    wait_until(lambda: sum(len(s.records()) for s in sinks) >= everything, 20, "every delivery")
    assert sorted(ids_at(pulls)) == sorted(to_pulls)
    assert ids_at(charges) == to_charges
    assert sorted(ids_at(default)) == sorted(to_route_2 + to_default)
    routed_2 = [r for r in default.records() if ["X-Route", "2"] in r["headers"]]  # type: ignore[operator]
    assert len(routed_2) == len(to_route_2)
    # A route's target signs as any target does (tests/test_connector_signing.py).
    for record in pulls.records():
        headers = {str(k): str(v) for k, v in record["headers"]}  # type: ignore[union-attr]
        body = base64.b64decode(str(record["body_b64"]))
        standardwebhooks.Webhook(SIGN_SECRET).verify(body, headers)
    assert dead_letters(cloud) == []


def test_without_a_fallback_an_unmatched_message_is_acked_and_counted(
    cloud: Cloud, sinks: list[Sink], connector: list[ConnectorProcess], tmp_path: Path
) -> None:
    routed = sinks[0]
    routes = [{"match": {"webhook": "github"}, "target": target(routed)}]
    config = settings(cloud, tmp_path, routes=routes)
    process = start(connector, tmp_path, config, "--log-format", "text")
    post(cloud, "other", {"a": 1})
    post(cloud, "stripe", {"a": 2})
    wanted = post(cloud, "github", {"a": 3})
    wait_until(lambda: ids_at(routed) == [wanted], 20, "the routed message")
    # The delivery line of an unmatched message says so, with the count since start.
    line = "-> - attempt 1: unmatched (acked, 2 so far)"
    wait_until(lambda: line in process.output(), 20, "the count")
    # Acked: a restarted connector gets nothing again, and nothing is dead-lettered.
    process.stop()
    again = start(connector, tmp_path, settings(cloud, tmp_path, routes=routes), name="again")
    last = post(cloud, "github", {"a": 4})
    wait_until(lambda: ids_at(routed) == [wanted, last], 20, "the next routed message")
    assert "unmatched" not in again.output()
    assert dead_letters(cloud) == []


def test_unmatched_nack_dead_letters_with_reason_unmatched(
    cloud: Cloud, sinks: list[Sink], connector: list[ConnectorProcess], tmp_path: Path
) -> None:
    routes = [{"match": {"header": {"X-GitHub-Event": "push"}}, "target": target(sinks[0])}]
    config = settings(cloud, tmp_path, routes=routes, unmatched="nack")
    start(connector, tmp_path, config)
    refused = post(cloud, "github", {}, X_GitHub_Event="issues")
    taken = post(cloud, "github", {}, X_GitHub_Event="push")
    wait_until(lambda: dead_letters(cloud) == [(refused, "unmatched")], 20, "the dead letter")
    wait_until(lambda: ids_at(sinks[0]) == [taken], 20, "the routed message")


def test_events_flag_keeps_the_named_github_stripe_and_standard_webhooks_events(
    cloud: Cloud, sinks: list[Sink], connector: list[ConnectorProcess], tmp_path: Path
) -> None:
    default = sinks[2]
    config = settings(cloud, tmp_path, default_target=target(default))
    port = free_port()
    flags = ("--events", "push, charge.succeeded,order.*", "--metrics-port", str(port))
    process = start(connector, tmp_path, config, *flags)
    kept = [
        post(cloud, "github", {"ref": "main"}, X_GitHub_Event="push"),
        post(cloud, "stripe", {"type": "charge.succeeded"}),
        post(cloud, "other", {"type": "order.created", "data": {}}),
    ]
    post(cloud, "github", {"action": "opened"}, X_GitHub_Event="issues")
    post(cloud, "stripe", {"type": "invoice.paid"})
    post(cloud, "other", {"no": "type"})
    wait_until(lambda: "unmatched (acked, 3 so far)" in process.output(), 20, "three unmatched")
    wait_until(lambda: sorted(ids_at(default)) == sorted(kept), 20, "the kept events")
    assert dead_letters(cloud) == []
    # Counted apart in /metrics: unmatched, not delivered.
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'webhook_connect_connector_deliveries_total{outcome="unmatched"} 3' in metrics
    assert 'webhook_connect_connector_deliveries_total{outcome="delivered"} 3' in metrics


def files_in(directory: Path) -> dict[str, bytes]:
    """What save_to_disk wrote: file name -> bytes (its temporary files left out)."""
    if not directory.exists():
        return {}
    return {f.name: f.read_bytes() for f in directory.iterdir() if f.suffix == ".json"}


def test_routes_deliver_by_module_or_chain_as_module_mode_does(
    cloud: Cloud, sinks: list[Sink], connector: list[ConnectorProcess], tmp_path: Path
) -> None:
    archive, chained = tmp_path / "archive", tmp_path / "chained"
    routes = [
        {
            "match": {"json": {"$.kind": "archive"}},
            "module": "save_to_disk",
            "module-config": {"path": str(archive)},
        },
        {
            "match": {"webhook": "github"},
            "chain": [{"module": "save_to_disk", "module-config": {"path": str(chained)}}],
        },
    ]
    config = settings(cloud, tmp_path, routes=routes, default_target=target(sinks[2]))
    start(connector, tmp_path, config)
    archived = post(cloud, "stripe", {"kind": "archive", "n": 1})
    in_chain = post(cloud, "github", {"kind": "other"})
    relayed = post(cloud, "stripe", {"kind": "other"})
    wait_until(lambda: len(files_in(archive)) == 1 and len(files_in(chained)) == 1, 20, "files")
    wait_until(lambda: ids_at(sinks[2]) == [relayed], 20, "the default target")
    assert files_in(archive) == {f"stripe-{archived}.json": b'{"kind": "archive", "n": 1}'}
    assert list(files_in(chained)) == [f"github-{in_chain}.json"]


def test_in_module_mode_what_no_route_takes_goes_by_the_webhooks_config_plans(
    cloud: Cloud, sinks: list[Sink], connector: list[ConnectorProcess], tmp_path: Path
) -> None:
    saved = tmp_path / "saved"
    plans = {"github": {"module": "save_to_disk", "module-config": {"path": str(saved)}}}
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    routes = [{"match": {"header": {"X-GitHub-Event": "push"}}, "target": target(sinks[0])}]
    config = settings(cloud, tmp_path, routes=routes, webhooks_config="plans.json")
    process = start(connector, tmp_path, config)
    pushed = post(cloud, "github", {}, X_GitHub_Event="push")
    opened = post(cloud, "github", {}, X_GitHub_Event="issues")
    post(cloud, "other", {})  # no route, no plan: unmatched
    wait_until(lambda: ids_at(sinks[0]) == [pushed], 20, "the routed push")
    wait_until(lambda: list(files_in(saved)) == [f"github-{opened}.json"], 20, "the planned one")
    wait_until(lambda: "unmatched (acked, 1 so far)" in process.output(), 20, "the unmatched")


BAD_ROUTES: list[tuple[str, dict[str, object], str]] = [
    ("routes[1].match.webhook", {"routes": [{}, {"webhook": "[a"}]}, "bad glob '[a'"),
    ("routes[0].match.header", {"routes": [{"header": {"X-E": "a[b"}}]}, "bad glob"),
    ("routes[0].match.json", {"routes": [{"json": {"$.a[": 1}}]}, "bad JSON path"),
    ("routes[0].match.json", {"routes": [{"json": {"action": 1}}]}, "must start with '$'"),
    ("routes[0].match.body", {"routes": [{"body": "x"}]}, "unknown key"),
    ("routes[0].match", {"routes": [{}], "empty": True}, "empty match"),
    ("routes[0]", {"routes": [{"webhook": "a"}], "both": True}, "not both"),
    ("routes[0].target", {"routes": [{"webhook": "a"}], "nowhere": True}, "no destination"),
    ("routes[0].color", {"routes": [{"webhook": "a"}], "extra": True}, "unknown key"),
    ("routes[0].module", {"routes": [{"webhook": "a"}], "module": "nope"}, "nope"),
    ("default_target.resign.provider", {"resign": {"provider": "paypal"}}, "'stripe'"),
    ("default_target.sign.secret", {"sign": {"secret": "s3cret"}}, "whsec_"),
    ("targets.github.sign.secret", {"tsign": {"secret": "whsec_!!"}}, "not base64"),
    ("events", {"events": ["push", "[x"]}, "bad glob"),
]


def bad_config(case: dict[str, object], sink_url: str) -> dict[str, object]:
    """A connector.json with the one mistake ``case`` describes, all else right."""
    http = {"url": sink_url}
    config: dict[str, object] = {"default_target": dict(http)}
    if "routes" in case:
        matches = case["routes"]
        assert isinstance(matches, list)
        routes: list[dict[str, object]] = [
            {"match": match or {"webhook": "ok"}, "target": http} for match in matches
        ]
        if case.get("empty"):
            routes[0]["match"] = {}
        if case.get("both"):
            routes[0]["module"] = "log"
        if case.get("nowhere"):
            del routes[0]["target"]
        if case.get("extra"):
            routes[0]["color"] = "red"
        if "module" in case:
            del routes[0]["target"]
            routes[0]["module"] = case["module"]
        config["routes"] = routes
    for key in ("sign", "resign"):
        if key in case:
            config["default_target"] = {**http, key: case[key]}
    if "tsign" in case:
        config["targets"] = {"github": {**http, "sign": case["tsign"]}}
        del config["default_target"]
    if "events" in case:
        config["events"] = case["events"]
    return config


@pytest.mark.parametrize(("where", "case", "reason"), BAD_ROUTES, ids=[c[0] for c in BAD_ROUTES])
def test_a_bad_route_or_signing_setting_is_one_line_and_exit_2_before_dialling(
    tmp_path: Path, where: str, case: dict[str, object], reason: str
) -> None:
    # Nothing listens on the cloud's port: a connector that dialled would log a retry instead.
    port = free_port()
    config = {
        "cloud_url": f"http://127.0.0.1:{port}",
        "channel": "dev",
        "token": TOKEN,
        "state_dir": str(tmp_path / "state"),
        **bad_config(case, "http://127.0.0.1:9/"),
    }
    path = tmp_path / "connector.json"
    path.write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "webhook_connect", "connector", "--config", str(path)],
        capture_output=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 2, done.stdout.decode() + done.stderr.decode()
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"webhook-connect: configuration error: {path}: {where}: "), lines[0]
    assert reason in lines[0]
    assert done.stdout == b"", "nothing logged: it never dialled"
