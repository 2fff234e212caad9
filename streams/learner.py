"""The learner: where the model learns. One learner owns one model.

It reads the single-partition outcomes topic in offset order, applies each outcome once, and
publishes a snapshot every N outcomes or T seconds. The snapshot is also its checkpoint: it
records the last outcomes offset it includes, so a restarted learner loads the newest snapshot
and replays from the next offset, reaching the state of a run that never crashed. No consumer
group is used: the offset that matters is the one inside the snapshot, not a commit.

Outcomes are at-least-once (the feedback worker may emit one twice), so the learner refuses an
outcome whose request id occurred in the previous ``SEEN_WINDOW`` outcome records, by offset.
Because that window is a function of the records alone, a restarted learner rebuilds it
exactly: it re-reads the ``SEEN_WINDOW`` records up to the snapshot's offset without applying
them (``remember``), then applies from the next offset, and refuses the same duplicates an
uninterrupted learner would, with a bit-identical state.

    learner = Learner(settings)
    learner.apply(outcome, offset)           # pure: no I/O; False for a duplicate
    frame = learner.snapshot_frame()         # bytes for the snapshots topic
    learner.restore(frame)                   # then remember() the records from window_start()

    await LearnerWorker(settings).run(stop_event)   # /metrics on http_port + 1 (router.metrics)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from pathlib import Path

from aiokafka import TopicPartition

from deploy.kafka import BrokerResetError, LogGuard, check_layout, make_consumer, make_producer
from router.metrics import LearnerMetrics, metrics_port, serve_metrics
from router.policy import RoutingPolicy, make_policy
from router.registry import ModelRegistry
from router.snapshot import SnapshotError, decode_snapshot, encode_snapshot, verification_keys
from schemas import DeadLetter, DecodeError, ModelSpec, Outcome, decode, encode
from schemas.settings import Settings

log = logging.getLogger(__name__)

#: An outcome whose request id occurred in this many previous outcome records (by offset) is a
#: duplicate: far more than the feedback worker can re-emit after a crash (its uncommitted
#: events), far less than the topic over months.
SEEN_WINDOW = 200_000
#: Seconds between the learner's checks that the broker still has its topics.
LAYOUT_CHECK_S = 5.0
#: Longest a fetch of outcomes may wait, in ms: part of the reward-to-snapshot time. The
#: embedded broker holds a fetch about this long even when records arrive meanwhile.
OUTCOMES_FETCH_WAIT_MS = 50


class Learner:
    """The model, the outcomes offset it includes, and the last snapshot version."""

    def __init__(self, settings: Settings, seen_window: int = SEEN_WINDOW) -> None:
        if seen_window < 1:
            raise ValueError("seen_window must be at least 1")
        self.settings = settings
        self.key = settings.snapshot_key.encode() if settings.snapshot_key else None  # signs
        self.accepted_keys = verification_keys(settings)
        self.policy: RoutingPolicy | None = None  # created at the first outcome: its dim decides
        self.offset = -1
        self.version = 0
        self.duplicates = 0
        self.seen_window = seen_window
        #: The models it may learn about: ROUTELOOP_MODELS and the models topic (router.registry).
        self.registry = ModelRegistry(settings.models)
        #: request id -> the offset of its newest record, oldest first; only the last
        #: ``seen_window`` offsets are kept.
        self._seen: OrderedDict[str, int] = OrderedDict()

    def restore(self, frame: bytes) -> None:
        """Continue from a snapshot (the newest valid one on the topic).

        The de-duplication window is not in the snapshot: feed the records from
        :meth:`window_start` to ``self.offset`` to :meth:`remember` before applying more.
        """
        snapshot = decode_snapshot(frame, key=self.accepted_keys)
        self.policy = snapshot.policy()
        self.offset = snapshot.header.outcomes_offset
        self.version = snapshot.header.version
        self._seen.clear()

    def window_start(self) -> int:
        """The first offset whose request id still counts for de-duplication after ``self.offset``."""
        return max(0, self.offset + 1 - self.seen_window)

    def _observe(self, request_id: str, offset: int) -> bool:
        """Record ``request_id`` at ``offset``; True if it occurred in the window before."""
        seen = self._seen
        oldest = offset - self.seen_window  # offsets <= this are out of the window
        while seen:
            first = next(iter(seen.values()))
            if first > oldest:
                break
            seen.popitem(last=False)
        duplicate = request_id in seen
        seen[request_id] = offset
        seen.move_to_end(request_id)
        return duplicate

    def remember(self, outcome: Outcome, offset: int) -> None:
        """Replay a record the state already includes (offset <= self.offset) into the window only.

        Raises DecodeError, as :meth:`apply` did, for an outcome that was refused.
        """
        if offset > self.offset:
            raise ValueError(f"offset {offset} is not included in the state (at {self.offset}): apply it")
        self._check(outcome)
        self._observe(outcome.request_id, offset)

    def _check(self, outcome: Outcome) -> None:
        """Refuse an outcome that would corrupt the model (DecodeError, for the dead letter).

        With candidate models configured, an outcome for a model never registered is refused:
        learning it would add an arm that every router would then route real traffic to. (A
        model is added at run time through the models topic.) Features of another dimension
        than the model's cannot be learned from.
        """
        if self.settings.models and not self.registry.known(outcome.model):
            raise DecodeError("unknown_model", f"{outcome.model[:128]!r} is neither in ROUTELOOP_MODELS "
                              "nor in the models topic")
        if self.policy is not None and outcome.features.shape[0] != self.policy.dim:
            raise DecodeError("bad_dimension", f"features have {outcome.features.shape[0]} dimensions, "
                              f"the model {self.policy.dim}")

    def seen(self) -> dict[str, int]:
        """The de-duplication window: request id -> offset of its newest record (for tests)."""
        return dict(self._seen)

    def apply(self, outcome: Outcome, offset: int) -> bool:
        """Learn from one outcome at ``offset``; False if it was already applied (at-least-once).

        Raises DecodeError (``unknown_model``, ``bad_dimension``) for an outcome it refuses;
        the offset counts as read either way.
        """
        self.offset = offset
        self._check(outcome)
        if self._observe(outcome.request_id, offset):
            self.duplicates += 1
            return False
        if self.policy is None:
            self.policy = make_policy(self.settings.policy, arms=list(self.settings.models or [outcome.model]),
                                      dim=outcome.features.shape[0], tau=self.settings.tau)
        if outcome.model not in self.policy.arms:
            self.policy.add_arm(outcome.model)  # a model added at run time starts from its prior
        arm = self.policy.arms.index(outcome.model)
        if outcome.price is not None:
            # The decision's price, not the registry's: the state depends on the outcomes alone
            # (and their order), so a recovered learner reaches the same one.
            self.policy.set_price(arm, outcome.price)
        self.policy.learn(arm, outcome.features, outcome.quality, outcome.cost_usd)
        return True

    def snapshot_frame(self) -> bytes:
        self.version += 1
        return encode_snapshot(self.policy, version=self.version, outcomes_offset=self.offset, key=self.key)


class LearnerWorker:
    """Runs a Learner on the outcomes topic; recovers from the snapshots topic at start.

    It stops with :class:`deploy.kafka.BrokerResetError` if the broker comes back empty (the
    outcomes log ends before the offsets it read, or a topic vanished or changed its partition
    count); its model is then also written to ``data_dir`` so that nothing learned is lost.
    """

    def __init__(self, settings: Settings, worker_id: str = "learner", seen_window: int = SEEN_WINDOW) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.learner = Learner(settings, seen_window=seen_window)
        self.published = 0
        #: Outcome records re-read at start to rebuild the de-duplication window.
        self.rebuilt = 0
        #: Where the model went when the broker came back empty (None otherwise).
        self.saved_model: Path | None = None
        self.metrics = LearnerMetrics()
        self.guard = LogGuard(worker_id)
        #: True once recovered and reading the outcomes topic.
        self.learning = False

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
        consumer = make_consumer(s, group_id=None, enable_auto_commit=False,
                                 fetch_max_wait_ms=OUTCOMES_FETCH_WAIT_MS)
        await producer.start()
        await consumer.start()
        watch: asyncio.Task | None = None
        try:
            part = TopicPartition(s.topic("outcomes"), 0)
            models = TopicPartition(s.topic("models"), 0)
            # The whole registry first: which models the replayed outcomes may name. (End
            # offsets are unreliable on the embedded broker: read until a fetch is empty.)
            consumer.assign([models])
            await consumer.seek_to_beginning(models)
            while batch := await consumer.getmany(models, timeout_ms=1000):
                await self._apply_specs(producer, batch[models])
            following = await consumer.position(models)
            consumer.assign([part, models])
            consumer.seek(models, following)
            # Records up to `included` are in the restored state: re-read the last SEEN_WINDOW
            # of them into the de-duplication window only, then apply from the next offset.
            included = self.learner.offset
            if included >= 0:
                self.guard.read(part, included)  # the snapshot says the log reaches this far
            consumer.seek(part, self.learner.window_start())
            rebuilding = included >= 0
            watch = asyncio.create_task(self._watch_layout(producer))
            unpublished, last_publish = 0, time.monotonic()
            self.learning = True
            while not stop.is_set():
                if watch.done():
                    watch.result()  # raises BrokerResetError
                batch = await consumer.getmany(timeout_ms=200, max_records=1000)
                await self._apply_specs(producer, batch.get(models, []))
                for record in batch.get(part, []):
                    self.guard.read(part, record.offset)
                    if record.offset <= included:
                        try:
                            self.learner.remember(decode(Outcome, record.value), record.offset)
                            self.rebuilt += 1
                        except DecodeError:
                            pass  # refused and dead-lettered by the run that read it
                        continue
                    if rebuilding:
                        rebuilding = False
                        self._log_rebuilt()
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
                self.guard.check(consumer)  # raises BrokerResetError
                if rebuilding and not batch.get(part):
                    # The window holds what the log still has (e.g. retention removed older
                    # records); nothing past the snapshot yet.
                    rebuilding = False
                    self._log_rebuilt()
                if unpublished and time.monotonic() - last_publish >= s.snapshot_every_s:
                    await self._publish(producer)
                    unpublished, last_publish = 0, time.monotonic()
                self._observe_lag(consumer.highwater(part))
        except BrokerResetError as exc:
            log.critical("%s", exc)
            self._save_model(exc)
            raise
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            await consumer.stop()
            await producer.stop()

    async def _apply_specs(self, producer, records) -> None:
        """Apply models-topic records to the registry; dead-letter those that are not ModelSpecs.

        A restarted learner re-reads the topic, so a bad record may be dead-lettered again, under
        the same key (its topic/partition/offset).
        """
        for record in records:
            self.guard.read(TopicPartition(record.topic, record.partition), record.offset)
            try:
                self.learner.registry.apply(decode(ModelSpec, record.value))
            except DecodeError as exc:
                self.metrics.deadletters.labels(reason=exc.reason, worker="learner").inc()
                await producer.send(self.settings.topic("deadletter"), encode(
                    DeadLetter.for_record(record, exc.reason, exc.detail, self.worker_id)),
                    key=f"{record.topic}/{record.partition}/{record.offset}".encode())

    def _log_rebuilt(self) -> None:
        log.info("de-duplication window rebuilt from %d outcome records (offsets %d..%d)",
                 self.rebuilt, self.learner.window_start(), self.learner.offset)

    async def _watch_layout(self, producer) -> None:
        while True:
            await asyncio.sleep(LAYOUT_CHECK_S)
            await check_layout(producer.client, self.settings, ("outcomes", "snapshots", "models"),
                               self.worker_id)

    def _save_model(self, reason: BrokerResetError) -> None:
        """Write the model to data_dir: with the broker's data gone it is the only copy."""
        if self.learner.policy is None:
            return
        learner = self.learner
        path = Path(self.settings.data_dir) / (
            f"learner-model-v{learner.version + 1}-outcomes-offset-{learner.offset}-{int(time.time())}.rls")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_snapshot(learner.policy, version=learner.version + 1,
                                             outcomes_offset=learner.offset, key=learner.key))
        except OSError as exc:
            log.error("could not save the model to %s: %r", path, exc)
            return
        self.saved_model = path
        log.critical("the model (%d updates, outcomes offset %d of the lost log) is saved in %s "
                     "(a snapshot frame)", learner.policy.n_updates, learner.offset, path)

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
