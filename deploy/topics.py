"""The topic layout of routeloop, and creating it on a cluster.

Every topic's full name is ``settings.topic(short_name)``. The requests, decisions,
responses and rewards topics have ``settings.partitions`` partitions each: they are
co-partitioned by request_id so that the feedback worker joins them locally. outcomes has
one partition (one learner owns one model), snapshots one compacted partition, deadletter
one partition::

    partitions = await ensure_topics(settings)   # {"routeloop.requests": 4, ...}
    async for record in iter_topic(settings, "outcomes"): ...   # everything on it, then stop

Create the topics before any worker starts: a metadata request for an unknown topic makes
the embedded broker (and a real cluster with ``auto.create.topics.enable``) create it with
its default partition count, which breaks the co-partitioning.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

from deploy.kafka import MAX_MESSAGE_BYTES, client_kwargs, make_consumer
from schemas.settings import Settings

_DAY_MS = 24 * 60 * 60 * 1000
#: A fetch that comes back empty after this long ends a topic read.
IDLE_MS = 1_500
_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3


class TopicLayoutError(RuntimeError):
    """A topic exists with a partition count other than the layout's."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic of the layout. ``partitions`` None means ``settings.partitions``."""

    partitions: int | None
    configs: Mapping[str, str] = field(default_factory=dict)

    def partitions_for(self, settings: Settings) -> int:
        return settings.partitions if self.partitions is None else self.partitions


# Retention and compaction are for real clusters; the embedded broker accepts them and
# enforces none. Retention must outlast the reward wait window (events) and the time
# between snapshots (outcomes are replayed from the newest snapshot's offset), by far.
_EVENTS = {"cleanup.policy": "delete", "retention.ms": str(7 * _DAY_MS)}

#: Short name -> spec, in the order the loop writes them.
TOPICS: Mapping[str, TopicSpec] = MappingProxyType(
    {
        "requests": TopicSpec(None, _EVENTS),
        "decisions": TopicSpec(None, _EVENTS),
        "responses": TopicSpec(None, _EVENTS),
        "rewards": TopicSpec(None, _EVENTS),
        # The learner's log and the offline evaluation's data set.
        "outcomes": TopicSpec(1, {"cleanup.policy": "delete", "retention.ms": str(30 * _DAY_MS)}),
        # One live version per key; the broker-side record limit leaves room for the
        # producer's MAX_MESSAGE_BYTES plus batch overhead.
        "snapshots": TopicSpec(
            1,
            {
                "cleanup.policy": "compact",
                "min.compaction.lag.ms": str(60 * 60 * 1000),
                "max.message.bytes": str(MAX_MESSAGE_BYTES + 1024 * 1024),
            },
        ),
        # The model registry: one live record per model name (router.registry).
        "models": TopicSpec(1, {"cleanup.policy": "compact"}),
        "deadletter": TopicSpec(1, {"cleanup.policy": "delete", "retention.ms": str(14 * _DAY_MS)}),
    }
)

#: The topics Faust joins by request_id: they must have the same partition count.
CO_PARTITIONED = ("requests", "decisions", "responses", "rewards")


def expected_partitions(settings: Settings) -> dict[str, int]:
    """Full topic name -> the partition count the layout wants, for these settings."""
    return {settings.topic(short): spec.partitions_for(settings) for short, spec in TOPICS.items()}


async def ensure_topics(settings: Settings) -> dict[str, int]:
    """Create the missing topics and check the existing ones; returns name -> partitions.

    Idempotent and safe to run from several processes at once. Raises
    :class:`TopicLayoutError` if a topic exists with another partition count.
    """
    expected = expected_partitions(settings)
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        # list_topics asks for all topics, which creates none; describing a missing topic
        # by name would auto-create it with the broker's default partition count.
        existing = set(await admin.list_topics())
        missing = [name for name in expected if name not in existing]
        if missing:
            by_name = {settings.topic(short): spec for short, spec in TOPICS.items()}
            response = await admin.create_topics(
                [
                    NewTopic(
                        name,
                        num_partitions=expected[name],
                        replication_factor=settings.replication_factor,
                        topic_configs=_configs(by_name[name], settings),
                    )
                    for name in missing
                ]
            )
            for name, code, message in response.topic_errors:
                # Already exists: another process won the race; it is checked below.
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise for_code(code)(f"creating topic {name}: {message}")
        actual = await _partition_counts(admin, list(expected))
    finally:
        await admin.close()
    wrong = {name: n for name, n in actual.items() if n != expected[name]}
    if wrong:
        details = "; ".join(
            f"{name} has {n} partition(s), expected {expected[name]}" for name, n in wrong.items()
        )
        raise TopicLayoutError(
            f"{details}. The requests, decisions, responses and rewards topics must be "
            "co-partitioned for the join, and outcomes/snapshots/deadletter have one partition. "
            "Set ROUTELOOP_PARTITIONS to the existing count, or delete and recreate the topics "
            "(or use another ROUTELOOP_TOPIC_PREFIX)."
        )
    return actual


async def delete_topics(settings: Settings, *, all_with_prefix: bool = False) -> list[str]:
    """Delete the layout's topics (or every topic named with the prefix); returns their names.

    On the embedded broker this is the only way to free the memory the messages take.
    ``all_with_prefix`` also removes e.g. Faust's changelog topics of an app whose id
    starts with the prefix. Missing topics are ignored.
    """
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        if all_with_prefix:
            names = sorted(n for n in existing if n.startswith(settings.topic_prefix))
        else:
            names = [n for n in expected_partitions(settings) if n in existing]
        if names:
            response = await admin.delete_topics(names)
            for name, code in response.topic_error_codes:
                if code not in (0, _UNKNOWN_TOPIC):
                    raise for_code(code)(f"deleting topic {name}")
    finally:
        await admin.close()
    return names


def _configs(spec: TopicSpec, settings: Settings) -> dict[str, str]:
    configs = dict(spec.configs)
    if settings.replication_factor >= 3:
        # With acks=all, a write then survives the loss of one replica.
        configs["min.insync.replicas"] = "2"
    return configs


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    counts = {}
    for topic in await admin.describe_topics(names):
        if topic["error_code"] != 0:
            raise for_code(topic["error_code"])(f"describing topic {topic['topic']}")
        counts[topic["topic"]] = len(topic["partitions"])
    return counts


async def iter_topic(settings: Settings, short: str, idle_ms: int = IDLE_MS) -> AsyncIterator[ConsumerRecord]:
    """Every record of a topic from its beginning, each partition in offset order, then stop.

    The end is the first fetch that comes back empty after ``idle_ms``: the embedded broker's
    end offsets are unreliable, so "read until the end offset" may stop early or never.
    """
    topic = settings.topic(short)
    parts = [TopicPartition(topic, p) for p in range(expected_partitions(settings)[topic])]
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        while batch := await consumer.getmany(timeout_ms=idle_ms, max_records=5_000):
            for records in batch.values():
                for record in records:
                    yield record
    finally:
        await consumer.stop()
