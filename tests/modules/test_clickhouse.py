"""The ClickHouse module against a real clickhouse-server (Debian's 18.16), read back over HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from tests.modules.dbcases import make_message, ride_out_an_outage
from tests.servers import free_port, running, stop, wait_until
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules.base import Permanent, Pools
from webhook_connect.shared.modules.clickhouse import ClickHouseConfig, ClickHouseModule

BINARY_BODY = b"\xff\xfe\x00raw\r\n\t\\N\\\x80 bytes\x00'"
CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/error.log</errorlog></logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <!-- Idle keep-alive connections would hold a graceful shutdown up for seconds. -->
    <keep_alive_timeout>1</keep_alive_timeout>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <mark_cache_size>67108864</mark_cache_size>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
</yandex>
"""
USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default/></profiles>
    <quotas><default/></quotas>
    <users>
        <relay>
            <password>s3cret</password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </relay>
    </users>
</yandex>
"""


class ClickHouseServer:
    """A clickhouse-server on free loopback ports, with one password-protected user."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        config = CONFIG.format(dir=directory, http_port=self.port, tcp_port=free_port())
        (directory / "config.xml").write_text(config)
        (directory / "users.xml").write_text(USERS)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"
        args = [binary, f"--config-file={self.directory / 'config.xml'}"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: self.query("SELECT 1") == "1\n", timeout=30, what="clickhouse-server")

    def query(self, sql: str) -> str:
        """Ask over HTTP with httpx's sync client (not the module's code)."""
        assert self.process is not None and self.process.poll() is None, "clickhouse exited"
        response = httpx.post(
            f"http://127.0.0.1:{self.port}/", content=sql, auth=("relay", "s3cret"), timeout=5
        )
        response.raise_for_status()
        return response.text

    def rows(self, sql: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.query(f"{sql} FORMAT JSONEachRow").splitlines()]

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def connection(self) -> ConnectionEntry:
        return ConnectionEntry(
            type="clickhouse",
            host="127.0.0.1",
            port=self.port,
            user="relay",
            password="s3cret",
            database="default",
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    with running(ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))) as clickhouse:
        yield clickhouse


async def started(server: ClickHouseServer, pools: Pools, **config: Any) -> ClickHouseModule:
    module = ClickHouseModule(ClickHouseConfig(**config), server.connection(), pools)
    await module.start()
    return module


async def test_row_holds_exact_body_json_payload_and_headers(server, pools) -> None:
    module = await started(server, pools, table="events")
    document = {"id": "evt_1", "amount": 1250, "nested": {"ok": True}, "text": "é€\t\n"}
    await module.deliver(make_message(json.dumps(document).encode(), "json-1"))
    await module.deliver(make_message(BINARY_BODY, "bin-1"))
    found = {
        r["message_id"]: r
        for r in server.rows(
            "SELECT message_id, hex(body) AS hex, payload, headers, webhook_id, channel, method,"
            " path, query_string, toUnixTimestamp(received_at) AS at FROM events"
        )
    }
    assert bytes.fromhex(found["json-1"]["hex"]) == json.dumps(document).encode()
    assert json.loads(found["json-1"]["payload"]) == document
    assert bytes.fromhex(found["bin-1"]["hex"]) == BINARY_BODY
    assert found["bin-1"]["payload"] is None
    first = found["json-1"]
    assert json.loads(first["headers"]) == {
        "content-type": "application/json",
        "x-event": "push, again",
    }
    assert (first["webhook_id"], first["channel"], first["method"]) == ("stripe", "orders", "POST")
    assert (first["path"], first["query_string"]) == ("/webhook/stripe", "a=1&b=%20")
    assert int(first["at"]) == 1_700_000_000  # DateTime: whole seconds before ClickHouse 20.1


@pytest.mark.parametrize("engine", ["ReplacingMergeTree", "MergeTree"])
async def test_redelivery_never_duplicates(server, pools, engine: str) -> None:
    module = await started(server, pools, table=f"again_{engine}", engine=engine)
    await module.deliver(make_message(b'{"v": 1}', "same"))
    await module.deliver(make_message(b'{"v": 2}', "same"))
    # Twice more in one batch, beside a new message.
    await asyncio.gather(
        *(module.deliver(make_message(b'{"v": 3}', mid)) for mid in ("same", "same", "new"))
    )
    found = server.rows(f"SELECT message_id, body FROM again_{engine} ORDER BY message_id")
    assert [(r["message_id"], r["body"]) for r in found] == [
        ("new", '{"v": 3}'),
        ("same", '{"v": 1}'),
    ]


async def test_same_message_id_in_two_channels_is_two_rows(server, pools) -> None:
    # Each Redis stream numbers its own messages: two channels can issue the same id.
    module = await started(server, pools, table="two_channels")
    same = "1700000000000-0"
    await asyncio.gather(  # one batch
        module.deliver(make_message(b'{"from": "a"}', same, "orders")),
        module.deliver(make_message(b'{"from": "b"}', same, "_direct.billing")),
    )
    await module.deliver(make_message(b'{"from": "a again"}', same, "orders"))  # redelivery
    server.query("OPTIMIZE TABLE two_channels FINAL")  # a merge keeps both: they differ in key
    found = server.rows("SELECT channel, message_id, body FROM two_channels ORDER BY channel")
    assert [tuple(r.values()) for r in found] == [
        ("_direct.billing", same, '{"from": "b"}'),
        ("orders", same, '{"from": "a"}'),
    ]


async def test_table_ordered_by_message_id_alone_still_takes_rows(server, pools) -> None:
    """A table an earlier version made (ORDER BY message_id): the look-up compares pairs."""
    server.query(
        "CREATE TABLE old_key (message_id String, webhook_id String, "
        "received_at Nullable(DateTime('UTC')), channel String, method String, path String, "
        "query_string String, headers Nullable(String), payload Nullable(String), body String) "
        "ENGINE = ReplacingMergeTree() ORDER BY message_id"
    )
    module = await started(server, pools, table="old_key")
    for channel in ("orders", "other", "orders"):
        await module.deliver(make_message(b"{}", "old", channel))
    found = server.rows("SELECT channel FROM old_key ORDER BY channel")
    assert [r["channel"] for r in found] == ["orders", "other"]


async def test_concurrent_deliveries_are_batched_and_all_stored(server, pools) -> None:
    module = await started(server, pools, table="bulk")
    count, gate = 1000, asyncio.Semaphore(50)

    async def one(number: int) -> None:
        async with gate:
            await module.deliver(make_message(b'{"n": %d}' % number, f"bulk-{number}"))

    began = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(count)))
    print(f"clickhouse: {count / (time.perf_counter() - began):.0f} msg/s at concurrency 50")
    assert server.query("SELECT count() FROM bulk") == f"{count}\n"


async def test_table_of_another_shape_is_a_permanent_error(server, pools) -> None:
    server.query("CREATE TABLE other (message_id String, body String) ENGINE = Log")
    module = await started(server, pools, table="other")
    with pytest.raises(Permanent, match="channel|webhook_id"):
        await module.deliver(make_message(b"{}", "x"))


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"table": "events` ENGINE = Memory --"}, "table"),
        ({"engine": "Log"}, "engine"),
        ({"upsert": True}, "Extra inputs are not permitted"),
    ],
)
def test_bad_module_config_is_refused(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ClickHouseConfig.model_validate(config)


async def test_server_down_is_transient_and_recovery_needs_no_restart(server, pools) -> None:
    await ride_out_an_outage(
        server, lambda table, shared: started(server, shared, table=table), pools
    )
    assert server.query("SELECT message_id FROM outage ORDER BY message_id") == "after\nbefore\n"
    assert server.query("SELECT count() FROM outage_late") == "1\n"
