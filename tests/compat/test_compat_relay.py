"""Their cloud's ``webhooks.json`` in our cloud, their ``connector.json`` in our connector:
real processes, a webhook relayed end to end."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx

from tests.servers import Cloud, ConnectorProcess, Sink, running, wait_until

FILES = Path(__file__).parent / "files" / "scenario"


def test_their_files_relay_a_webhook_end_to_end(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'cloud.db'}"
    with (
        running(Cloud(storage, FILES / "cloud-webhooks.json", tmp_path)) as cloud,
        running(Sink(tmp_path)) as sink,
    ):
        # Their connector file as it is, pointed at this test's cloud and sink.
        settings = json.loads((FILES / "connector-http.json").read_text())
        settings["cloud_url"] = cloud.url
        settings["default_target"]["url"] = sink.url.rstrip("/") + "/hook"
        connector = ConnectorProcess(tmp_path, settings)
        try:
            connector.start()
            body = b'{"event": "compat", "n": 1}'
            answer = httpx.post(
                f"{cloud.url}/webhook/relay-one",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=5,
            )
            assert answer.status_code == 202, answer.text
            wait_until(lambda: sink.records(), timeout=20, what="the webhook at the sink")
            [record] = sink.records()
            assert base64.b64decode(str(record["body_b64"])) == body
            assert record["path"] == "/hook"
        finally:
            connector.stop()
        output = connector.output()
        # Keys of neither project: one line each, and the connector ran anyway.
        for key in ("retry_attempts", "retry_delay"):
            assert output.count(f"{key}: unknown key, ignored") == 1, output
