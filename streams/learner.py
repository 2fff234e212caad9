"""The learner: where the model learns. One learner owns one model.

It reads the single-partition outcomes topic in offset order, applies each outcome once, and
publishes a snapshot every N outcomes or T seconds. The snapshot is also its checkpoint: it
records the last outcomes offset it includes, so a restarted learner loads the newest snapshot
and replays from the next offset, reaching the state of a run that never crashed. No consumer
group is used: the offset that matters is the one inside the snapshot, not a commit.

    learner = Learner(settings)
    learner.apply(outcome, offset)           # pure: no I/O
    frame = learner.snapshot_frame()         # bytes for the snapshots topic

    await LearnerWorker(settings).run(stop_event)   # /metrics on http_port + 1 (router.metrics)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from aiokafka import TopicPartition

from deploy.kafka import make_consumer, make_producer
from router.metrics import LearnerMetrics, metrics_port, serve_metrics
from router.policy import RoutingPolicy, make_policy
from router.snapshot import SnapshotError, decode_snapshot, encode_snapshot, verification_keys
from schemas import DeadLetter, DecodeError, Outcome, decode, encode
from schemas.settings import Settings

log = logging.getLogger(__name__)

#: How many recent request ids the learner remembers to apply a re-emitted outcome once.
SEEN_WINDOW = 200_000


class Learner:
    """The model, the outcomes offset it includes, and the last snapshot version."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key = settings.snapshot_key.encode() if settings.snapshot_key else None  # signs
        self.accepted_keys = verification_keys(settings)
        self.policy: RoutingPolicy | None = None  # created at the first outcome: its dim decides
        self.offset = -1
        self.version = 0
        self.duplicates = 0
        self._seen: OrderedDict[str, None] = OrderedDict()

    def restore(self, frame: bytes) -> None:
        """Continue from a snapshot (the newest valid one on the topic)."""
        snapshot = decode_snapshot(frame, key=self.accepted_keys)
        self.policy = snapshot.policy()
        self.offset = snapshot.header.outcomes_offset
        self.version = snapshot.header.version

    def apply(self, outcome: Outcome, offset: int) -> bool:
        """Learn from one outcome at ``offset``; False if it was already applied (at-least-once)."""
        self.offset = offset
        if outcome.request_id in self._seen:
            self.duplicates += 1
            return False
        self._seen[outcome.request_id] = None
        if len(self._seen) > SEEN_WINDOW:
            self._seen.popitem(last=False)
        if self.policy is None:
            self.policy = make_policy(self.settings.policy, arms=list(self.settings.models or [outcome.model]),
                                      dim=outcome.features.shape[0], tau=self.settings.tau)
        if outcome.model not in self.policy.arms:
            self.policy.add_arm(outcome.model)  # a model added at run time starts from its prior
        self.policy.learn(self.policy.arms.index(outcome.model), outcome.features,
                          outcome.quality, outcome.cost_usd)
        return True

    def snapshot_frame(self) -> bytes:
        self.version += 1
        return encode_snapshot(self.policy, version=self.version, outcomes_offset=self.offset, key=self.key)


class LearnerWorker:
    """Runs a Learner on the outcomes topic; recovers from the snapshots topic at start."""

    def __init__(self, settings: Settings, worker_id: str = "learner") -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.learner = Learner(settings)
        self.published = 0
        self.metrics = LearnerMetrics()

    async def _recover(self) -> None:
        s = self.settings
        consumer = make_consumer(s, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            part = TopicPartition(s.topic("snapshots"), 0)
            consumer.assign([part])
            await consumer.seek_to_beginning(part)
            newest = None
            # End offsets are unreliable on the embedded broker: read until a fetch is empty.
            while batch := await consumer.getmany(part, timeout_ms=1500):
                for record in batch[part]:
                    try:
                        candidate = decode_snapshot(record.value, key=self.learner.accepted_keys)
                    except SnapshotError as exc:
                        log.warning("skipping snapshot at offset %d: %s", record.offset, exc)
                        continue
                    if newest is None or candidate.header.version > newest[0]:
                        newest = (candidate.header.version, record.value)
            if newest is not None:
                self.learner.restore(newest[1])
                self.metrics.snapshot_version.set(self.learner.version)
                self.metrics.offset.set(self.learner.offset)
                log.info("recovered snapshot version %d at outcomes offset %d",
                         self.learner.version, self.learner.offset)
        finally:
            await consumer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        metrics_server = serve_metrics(self.metrics.registry, metrics_port(self.settings, "learner"))
        try:
            await self._recover()
            await self._learn(stop)
        finally:
            if metrics_server is not None:
                await asyncio.to_thread(metrics_server.shutdown)
                metrics_server.server_close()

    async def _learn(self, stop: asyncio.Event) -> None:
        s = self.settings
        producer = make_producer(s)
        consumer = make_consumer(s, group_id=None, enable_auto_commit=False)
        await producer.start()
        await consumer.start()
        try:
            part = TopicPartition(s.topic("outcomes"), 0)
            consumer.assign([part])
            consumer.seek(part, self.learner.offset + 1)
            unpublished, last_publish = 0, time.monotonic()
            while not stop.is_set():
                batch = await consumer.getmany(part, timeout_ms=200, max_records=1000)
                for record in batch.get(part, []):
                    try:
                        applied = self.learner.apply(decode(Outcome, record.value), record.offset)
                        unpublished += applied
                        (self.metrics.updates if applied else self.metrics.duplicates).inc()
                    except DecodeError as exc:
                        self.learner.offset = record.offset
                        self.metrics.deadletters.labels(reason=exc.reason, worker="learner").inc()
                        await producer.send(s.topic("deadletter"), encode(
                            DeadLetter.for_record(record, exc.reason, exc.detail, self.worker_id)))
                    if unpublished >= s.snapshot_every_n:
                        await self._publish(producer)
                        unpublished, last_publish = 0, time.monotonic()
                if unpublished and time.monotonic() - last_publish >= s.snapshot_every_s:
                    await self._publish(producer)
                    unpublished, last_publish = 0, time.monotonic()
                self._observe_lag(consumer.highwater(part))
        finally:
            await consumer.stop()
            await producer.stop()

    def _observe_lag(self, highwater: int | None) -> None:
        self.metrics.offset.set(self.learner.offset)
        if highwater is not None:  # None until the first fetch answered
            self.metrics.lag.set(max(0, highwater - (self.learner.offset + 1)))

    async def _publish(self, producer) -> None:
        frame = self.learner.snapshot_frame()
        await producer.send_and_wait(self.settings.topic("snapshots"), frame, key=b"model")
        self.published += 1
        self.metrics.snapshots_published.inc()
        self.metrics.snapshot_version.set(self.learner.version)
        log.info("published snapshot version %d (%d bytes) at outcomes offset %d",
                 self.learner.version, len(frame), self.learner.offset)


def run_learner(settings: Settings) -> None:
    """Run the learner in the foreground until SIGINT/SIGTERM."""
    from deploy.process import run_until_signalled

    run_until_signalled(LearnerWorker(settings).run, settings.log_level)
