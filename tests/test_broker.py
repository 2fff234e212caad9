"""The embedded broker, the topic layout and the client helpers, against a real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

from deploy.broker import BrokerError, EmbeddedBroker
from deploy.kafka import client_kwargs, make_consumer, make_producer
from deploy.topics import TopicLayoutError, delete_topics, ensure_topics, expected_partitions
from schemas.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


async def consume(settings: Settings, topic: str, count: int, timeout_s: float = 15.0) -> list:
    """Read ``count`` records of ``topic`` from the start (not via end offsets: unreliable)."""
    records: list = []
    async with make_consumer(settings, topic, auto_offset_reset="earliest") as consumer:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(records) < count and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            records.extend(r for batch in batches.values() for r in batch)
    return records


async def test_produce_consume_round_trip(settings: Settings) -> None:
    topic = settings.topic("requests")
    async with make_producer(settings) as producer:
        await producer.send_and_wait(
            topic, b'{"prompt": "hi"}', key=b"req-1", headers=[("v", b"1")]
        )

    records = []
    consumer = make_consumer(settings, topic, group_id="round-trip", auto_offset_reset="earliest")
    async with consumer, asyncio.timeout(30):
        while not records:
            batches = await consumer.getmany(timeout_ms=500)
            records.extend(r for batch in batches.values() for r in batch)
        await consumer.commit()
        committed = await consumer.committed(TopicPartition(topic, records[0].partition))

    assert [(r.key, r.value, list(r.headers)) for r in records] == [
        (b"req-1", b'{"prompt": "hi"}', [("v", b"1")])
    ]
    assert committed == records[0].offset + 1


async def test_ensure_topics_creates_the_layout_and_is_idempotent(settings: Settings) -> None:
    fresh = settings.model_copy(
        update={"topic_prefix": settings.topic_prefix + "fresh.", "partitions": 3}
    )
    try:
        created = await ensure_topics(fresh)
        again = await ensure_topics(fresh)
    finally:
        await delete_topics(fresh)

    p = fresh.topic_prefix
    assert created == {
        f"{p}requests": 3, f"{p}decisions": 3, f"{p}responses": 3, f"{p}rewards": 3,
        f"{p}outcomes": 1, f"{p}snapshots": 1, f"{p}models": 1, f"{p}deadletter": 1,
    }  # fmt: skip
    assert again == created == expected_partitions(fresh)


async def test_concurrent_ensure_topics_agree(settings: Settings) -> None:
    fresh = settings.model_copy(update={"topic_prefix": settings.topic_prefix + "race."})
    try:
        results = await asyncio.gather(*(ensure_topics(fresh) for _ in range(3)))
    finally:
        await delete_topics(fresh)
    assert results[0] == results[1] == results[2] == expected_partitions(fresh)


async def test_wrong_partition_count_is_a_clear_error(settings: Settings) -> None:
    # The fixture created the co-partitioned topics with 2 partitions.
    expected_error = r"requests has 2 partition\(s\), expected 3.*co-partitioned"
    with pytest.raises(TopicLayoutError, match=expected_error):
        await ensure_topics(settings.model_copy(update={"partitions": 3}))


async def test_one_preexisting_topic_with_wrong_count_is_reported(settings: Settings) -> None:
    fresh = settings.model_copy(update={"topic_prefix": settings.topic_prefix + "pre."})
    admin = AIOKafkaAdminClient(**client_kwargs(fresh))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(fresh.topic("rewards"), 5, 1)])
        with pytest.raises(TopicLayoutError) as raised:
            await ensure_topics(fresh)
    finally:
        await admin.close()
        await delete_topics(fresh)
    message = str(raised.value)
    assert f"{fresh.topic('rewards')} has 5 partition(s), expected 2" in message
    assert fresh.topic("requests") not in message  # only the wrong topic is named


async def test_delete_topics_removes_the_layout(settings: Settings) -> None:
    fresh = settings.model_copy(update={"topic_prefix": settings.topic_prefix + "del."})
    await ensure_topics(fresh)
    deleted = await delete_topics(fresh)
    assert sorted(deleted) == sorted(expected_partitions(fresh))
    assert await delete_topics(fresh) == []


async def test_freeze_and_thaw_keep_the_data(broker: EmbeddedBroker, settings: Settings) -> None:
    topic = settings.topic("outcomes")
    async with make_producer(settings) as producer:
        for i in range(10):
            await producer.send(topic, f"before-{i}".encode(), key=b"k")
        await producer.flush()

    broker.freeze()
    try:
        assert broker.frozen and broker.is_running()
        admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=1_000)
        with pytest.raises((KafkaConnectionError, asyncio.TimeoutError)):
            await asyncio.wait_for(admin.start(), timeout=5)  # no answers while frozen
        await admin.close()
    finally:
        broker.thaw()
    assert not broker.frozen

    async with make_producer(settings) as producer:
        await producer.send_and_wait(topic, b"after", key=b"k")
    values = [r.value for r in await consume(settings, topic, 11)]
    assert values == [f"before-{i}".encode() for i in range(10)] + [b"after"]


def test_start_refuses_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerError, match="already in use"):
            EmbeddedBroker(port).start()


def test_context_manager_stops_the_process(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "b.log") as broker:
        pid = broker.pid
        assert broker.is_running() and broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        broker.freeze()  # stop() must also end a frozen broker
    assert not broker.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "listening on" in (tmp_path / "b.log").read_text()


def test_run_broker_creates_topics_and_stops_on_sigterm() -> None:
    code = (
        "from deploy.broker import run_broker; from schemas.settings import Settings; "
        "run_broker(Settings(topic_prefix='cli.', partitions=3), 0)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "ready on 127.0.0.1:" in first, first
        topics = [process.stdout.readline() for _ in range(7)]
        assert "topic cli.requests: 3 partition(s)" in topics[0]
        assert "topic cli.outcomes: 1 partition(s)" in topics[4]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
