"""What the public answers say (issue 12, defect 5): ``/ready`` and a webhook sender's 503 carry
a short reason, never the storage URL or an error's text; the admin token sees the details, and
the operator finds them in the log.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.servers import Cloud, RedisServer, running, wait_until

ADMIN = "public-pages-admin-token"
WEBHOOKS = {
    "hook": {
        "module": "webhook_connect",
        "data_type": "blob",
        "module-config": {"channel": "dev", "channel_token": "public-pages-channel-token"},
    }
}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def write_webhooks(workdir: Path) -> Path:
    path = workdir / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    return path


def test_ready_names_no_storage_to_strangers(tmp_path: Path) -> None:
    database = tmp_path / "private-name.db"
    cloud = Cloud(
        f"sqlite:///{database}", write_webhooks(tmp_path), tmp_path, "--admin-token", ADMIN
    )
    with running(cloud):
        wait_until(lambda: httpx.get(f"{cloud.url}/ready").status_code == 200, what="ready")
        public = httpx.get(f"{cloud.url}/ready")
        admin = httpx.get(f"{cloud.url}/ready", headers=AS_ADMIN)
    assert public.json() == {"status": "ready"}
    assert admin.json() == {"status": "ready", "storage": f"sqlite:///{database}"}


def test_storage_down_says_storage_and_nothing_more(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    cloud = Cloud(redis_server.url, write_webhooks(tmp_path), tmp_path, "--admin-token", ADMIN)
    port = str(redis_server.port)
    with running(redis_server), running(cloud):
        assert httpx.post(f"{cloud.url}/webhook/hook", content=b"1").status_code == 202
        redis_server.stop()
        down = httpx.post(f"{cloud.url}/webhook/hook", content=b"2", timeout=30)
        ready = httpx.get(f"{cloud.url}/ready", timeout=30)
        detailed = httpx.get(f"{cloud.url}/ready", headers=AS_ADMIN, timeout=30)

    # The sender: a short reason it can act on (retry), no host, port or driver text.
    assert down.status_code == 503 and down.headers["retry-after"]
    assert down.json() == {"error": "storage_unavailable", "detail": "storage unavailable"}
    # A probe or a stranger: the same.
    assert ready.status_code == 503 and ready.headers["retry-after"]
    assert ready.json() == {"status": "unavailable", "reason": "storage"}
    # The admin token and the log: what failed where.
    assert detailed.status_code == 503
    assert detailed.json()["storage"] == redis_server.url
    assert port in detailed.json()["detail"]
    log = cloud.log.read_text()
    assert "webhooks answered 503, storage unavailable" in log and port in log
    assert "not ready: storage" in log
