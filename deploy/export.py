"""Exporting a topic's events to JSON Lines, for offline evaluation and audits.

    n = asyncio.run(export_topic(settings, "outcomes", Path("outcomes.jsonl")))
"""

from __future__ import annotations

from pathlib import Path

from aiokafka import TopicPartition

from deploy.kafka import make_consumer
from deploy.topics import expected_partitions
from schemas.settings import Settings


async def export_topic(settings: Settings, short: str, path: Path) -> int:
    """Write every record of a topic (one JSON event a line) to ``path``; returns the count."""
    topic = settings.topic(short)
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    await consumer.start()
    count = 0
    try:
        parts = [TopicPartition(topic, p) for p in range(expected_partitions(settings)[topic])]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        with open(path, "wb") as out:
            # End offsets are unreliable on the embedded broker: read until a fetch is empty.
            while batch := await consumer.getmany(timeout_ms=2000):
                for records in batch.values():
                    for record in records:
                        out.write(record.value + b"\n")
                        count += 1
    finally:
        await consumer.stop()
    return count
