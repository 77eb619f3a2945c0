"""The PostgreSQL module against a real PostgreSQL 15, read back with an independent client."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from tests.modules.dbcases import make_message, ride_out_an_outage
from tests.servers import free_port, running, stop, wait_until
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules.base import Permanent, Pools
from webhook_connect.shared.modules.dbtable import SqlTableConfig
from webhook_connect.shared.modules.postgresql import PostgreSQLModule

# Debian's server binaries, the newest installed major version (bookworm: 15).
BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin/initdb"),
    default=Path("/usr/lib/postgresql/15/bin/initdb"),
).parent
BINARY_BODY = b"\xff\xfe\x00raw\r\n\x80 bytes\x00"


class PostgresServer:
    """A throwaway cluster run as ``postgres`` (initdb and postgres refuse root).

    Its directory is not under pytest's tmp_path: that tree is root-only (mode 700), which
    the ``postgres`` user cannot enter.
    """

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="wc-pg-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [
                BIN / "initdb",
                "-D",
                self.directory / "data",
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            user="postgres",
            group="postgres",
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        args = [
            BIN / "postgres",
            "-D",
            self.directory / "data",
            "-k",
            self.directory,
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=on",
        ]
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                args, user="postgres", group="postgres", stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._ready, timeout=20, what=f"postgres on port {self.port}")

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, "postgres exited"
        ready = [BIN / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(ready).returncode == 0

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, signal.SIGINT)  # fast shutdown: SIGTERM waits for clients
            self.process = None

    def connection(self) -> ConnectionEntry:
        return ConnectionEntry(
            type="postgresql",
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            database="postgres",
            pool_max_size=4,
        )


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    postgres = PostgresServer()
    try:
        with running(postgres):
            yield postgres
    finally:
        shutil.rmtree(postgres.directory, ignore_errors=True)


async def started(server: PostgresServer, pools: Pools, **config: Any) -> PostgreSQLModule:
    module = PostgreSQLModule(SqlTableConfig(**config), server.connection(), pools)
    await module.start()
    return module


async def rows(server: PostgresServer, sql: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres")
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


async def test_row_holds_exact_body_json_payload_and_headers(server, pools) -> None:
    module = await started(server, pools, table="events")
    document = {"id": "evt_1", "amount": 1250, "nested": {"ok": True}, "text": "é€"}
    await module.deliver(make_message(json.dumps(document).encode(), "json-1"))
    await module.deliver(make_message(BINARY_BODY, "bin-1"))
    found = {r["message_id"]: r for r in await rows(server, "SELECT * FROM events")}
    assert found["json-1"]["body"] == json.dumps(document).encode()
    assert json.loads(found["json-1"]["payload"]) == document
    assert found["bin-1"]["body"] == BINARY_BODY
    assert found["bin-1"]["payload"] is None
    first = found["json-1"]
    assert json.loads(first["headers"]) == {
        "content-type": "application/json",
        "x-event": "push, again",
    }
    assert (first["webhook_id"], first["channel"], first["method"]) == ("stripe", "orders", "POST")
    assert (first["path"], first["query_string"]) == ("/webhook/stripe", "a=1&b=%20")
    assert first["received_at"].timestamp() == 1_700_000_000.25


async def test_redelivery_never_duplicates(server, pools) -> None:
    keep = await started(server, pools, table="keep_first")
    latest = await started(server, pools, table="keep_latest", upsert=True)
    for module in (keep, latest):
        await module.deliver(make_message(b'{"v": 1}', "same"))
        await module.deliver(make_message(b'{"v": 2}', "same"))
    assert [r["body"] for r in await rows(server, "SELECT body FROM keep_first")] == [b'{"v": 1}']
    assert [r["body"] for r in await rows(server, "SELECT body FROM keep_latest")] == [b'{"v": 2}']


@pytest.mark.parametrize("upsert", [False, True])
async def test_same_message_id_in_two_channels_is_two_rows(server, pools, upsert: bool) -> None:
    # Each Redis stream numbers its own messages: two channels can issue the same id.
    table = f"two_channels_{str(upsert).lower()}"
    module = await started(server, pools, table=table, upsert=upsert)
    same = "1700000000000-0"
    await asyncio.gather(  # one batch
        module.deliver(make_message(b'{"from": "a"}', same, "orders")),
        module.deliver(make_message(b'{"from": "b"}', same, "_direct.billing")),
    )
    await module.deliver(make_message(b'{"from": "a again"}', same, "orders"))  # redelivery
    found = await rows(server, f"SELECT channel, message_id, body FROM {table} ORDER BY channel")
    assert [tuple(r) for r in found] == [
        ("_direct.billing", same, b'{"from": "b"}'),
        ("orders", same, b'{"from": "a again"}' if upsert else b'{"from": "a"}'),
    ]


async def test_table_keyed_on_message_id_alone_still_takes_rows(server, pools) -> None:
    """Tables an earlier version made: keyed on message_id, without channel in relational mode."""
    await rows(
        server,
        "CREATE TABLE old_json (message_id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, "
        "received_at TIMESTAMPTZ, channel TEXT NOT NULL, method TEXT NOT NULL, "
        "path TEXT NOT NULL, query_string TEXT NOT NULL, headers JSONB, payload JSONB, "
        "body BYTEA NOT NULL)",
    )
    await rows(
        server,
        "CREATE TABLE old_relational (message_id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, "
        "received_at TIMESTAMPTZ, amount BIGINT)",
    )
    json_mode = await started(server, pools, table="old_json", upsert=True)
    schema = {"fields": {"amount": {"column": "amount", "type": "integer"}}}
    relational = await started(
        server, pools, table="old_relational", storage_mode="relational", schema=schema
    )
    for module in (json_mode, relational):
        await module.deliver(make_message(b'{"amount": 1}', "old"))
        await module.deliver(make_message(b'{"amount": 2}', "old"))
    found = await rows(server, "SELECT message_id, payload FROM old_json")
    assert [(r["message_id"], json.loads(r["payload"])) for r in found] == [("old", {"amount": 2})]
    found = await rows(server, "SELECT message_id, amount FROM old_relational")
    assert [tuple(r) for r in found] == [("old", 1)]


async def test_upsert_key_from_the_body_merges_provider_retries(server, pools) -> None:
    module = await started(server, pools, table="by_event", upsert=True, upsert_key="event_id")
    await module.deliver(make_message(b'{"event_id": "e1", "n": 1}', "first"))
    await module.deliver(make_message(b'{"event_id": "e1", "n": 2}', "second"))
    found = await rows(server, "SELECT event_id, message_id FROM by_event")
    assert [(r["event_id"], r["message_id"]) for r in found] == [("e1", "second")]
    with pytest.raises(Permanent, match="event_id"):
        await module.deliver(make_message(b'{"other": 1}', "third"))


async def test_concurrent_deliveries_are_batched_and_all_stored(server, pools) -> None:
    module = await started(server, pools, table="bulk")
    count, concurrency = 2000, 50
    gate = asyncio.Semaphore(concurrency)

    async def one(number: int) -> None:
        async with gate:
            await module.deliver(make_message(b'{"n": %d}' % number, f"bulk-{number}"))

    began = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(count)))
    rate = count / (time.perf_counter() - began)
    print(f"postgresql: {rate:.0f} msg/s at concurrency {concurrency}")
    assert (await rows(server, "SELECT count(*) AS n FROM bulk"))[0]["n"] == count
    # The target is 2,000 msg/s; the floor leaves room for a loaded CI machine.
    assert rate > 700


async def test_rejected_row_is_permanent_and_spares_its_batch(server, pools) -> None:
    module = await started(server, pools, table="rejects")
    # PostgreSQL's jsonb cannot hold \u0000: the server refuses this one row.
    bad = make_message(b'{"text": "nul \\u0000 here"}', "bad")
    results = await asyncio.gather(
        *(module.deliver(make_message(b'{"ok": %d}' % n, f"good-{n}")) for n in range(5)),
        module.deliver(bad),
        return_exceptions=True,
    )
    assert results[:5] == [None] * 5
    assert isinstance(results[5], Permanent)
    found = await rows(server, "SELECT message_id FROM rejects ORDER BY message_id")
    assert [r["message_id"] for r in found] == [f"good-{n}" for n in range(5)]


async def test_hybrid_mode_maps_fields_to_typed_columns(server, pools) -> None:
    schema = {
        "fields": {
            "id": {"column": "event_id", "type": "string", "constraints": ["NOT NULL"]},
            "amount": {"column": "amount", "type": "integer"},
            "paid": {"column": "paid", "type": "bool"},
        },
        "indexes": {"idx_hybrid_amount": {"columns": ["amount"]}},
    }
    module = await started(server, pools, table="hybrid", storage_mode="hybrid", schema=schema)
    await module.deliver(make_message(b'{"id": "evt_9", "amount": 42, "paid": true}', "h1"))
    found = await rows(server, "SELECT event_id, amount, paid, body FROM hybrid")
    assert [tuple(r) for r in found] == [
        ("evt_9", 42, True, b'{"id": "evt_9", "amount": 42, "paid": true}')
    ]
    with pytest.raises(Permanent, match="not-null|null value"):
        await module.deliver(make_message(b'{"amount": 1}', "h2"))
    with pytest.raises(Permanent, match="invalid input syntax"):
        await module.deliver(make_message(b'{"id": "x", "amount": "lots"}', "h3"))
    with pytest.raises(Permanent, match="JSON object"):
        await module.deliver(make_message(BINARY_BODY, "h4"))


async def test_connection_may_be_a_url(server, pools) -> None:
    url = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    entry = ConnectionEntry(type="postgresql", url=url)
    module = PostgreSQLModule(SqlTableConfig(table="via_url"), entry, pools)
    await module.deliver(make_message(b"{}", "u1"))
    assert len(await rows(server, "SELECT 1 FROM via_url")) == 1
    with pytest.raises(ValidationError, match="prot"):
        PostgreSQLModule(SqlTableConfig(), ConnectionEntry(type="postgresql", prot=5432), pools)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"table": 'events"; DROP TABLE x; --'}, "table"),
        ({"upsert_key": "id-with-dash"}, "upsert_key"),
        ({"storage_mode": "relational"}, "needs a 'schema'"),
        ({"storage_mode": "hybrid", "schema": {"fields": {"a": {"column": "body"}}}}, "twice"),
        ({"schema": {"event_id": "BLOB"}}, "unknown column type"),
        ({"tabel": "events"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_module_config_is_refused(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        SqlTableConfig.model_validate(config)


async def test_server_down_is_transient_and_recovery_needs_no_restart(server, pools) -> None:
    await ride_out_an_outage(
        server, lambda table, shared: started(server, shared, table=table), pools
    )
    found = await rows(server, "SELECT message_id FROM outage ORDER BY message_id")
    assert [r["message_id"] for r in found] == ["after", "before"]
    assert len(await rows(server, "SELECT 1 FROM outage_late")) == 1
