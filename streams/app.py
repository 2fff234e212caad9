"""The feedback worker: a Faust app that joins decisions, responses and rewards into outcomes.

One agent reads the decisions, responses and rewards topics at once (they are
co-partitioned by request_id), decodes every message with :mod:`schemas.codec` and
feeds it to a :class:`streams.join.RewardJoiner` whose state is a changelog-backed
Faust Table keyed by request_id. Outcomes go to the outcomes topic, keyed by
request_id; everything the worker cannot use goes to the deadletter topic as a
:class:`schemas.events.DeadLetter` with a reason code: undecodable bytes (the codec's
reason), an event whose message key is not its request id (``key_mismatch``: it may sit
on another partition than its decision and would never join), and the joiner's
duplicates, late and orphaned events. A timer sweeps the table every
``min(1 s, reward_wait_s / 4)``: entries older than the reward window are closed
(defaulted outcome, or dead letters) and old tombstones removed::

    app = create_app(settings)        # a faust.App, nothing started
    run_feedback_worker(settings)     # `routeloop worker feedback`: blocks until SIGTERM/SIGINT

Processing is at-least-once: Faust commits a source offset only after flushing what
the worker produced for it, so a crash replays the uncommitted events, which the
joiner then mostly recognises as duplicates. A closed join's tombstone reaches the
table (and its changelog) only once its outcome is acknowledged, and only then is the
event that closed it acknowledged to Faust, so no source offset past it is committed
before (:class:`TableState`, :meth:`FeedbackWorker._release_when_acked`): a crash in
between replays that event against the pending entry, which joins again. An outcome
may so be emitted twice, which the learner de-duplicates by request_id; none is lost.

Faust (faust-streaming 0.15.3) on the embedded broker needed (see DESIGN.md):

* group timeouts from settings (a group join waits about half the session timeout),
  no leader topic, no idempotent producer (refused; Faust asks for one only with
  exactly_once), acks=-1, no web server; topic declaration stays allowed because Faust
  creates the table's changelog topic itself (existing topics are left alone);
* :func:`install_true_highwaters`: table recovery stops at the broker's end offsets,
  which are short, so a restarted worker lost its newest join state;
* :class:`RouteloopApp`: Faust's recovery drops the events fetched while it seeks the
  source partitions to their committed offsets (:class:`_FlowControl`), and Faust's
  consumer commits past a message not yet acknowledged (:class:`_AtLeastOnceConsumer`);
* :class:`TableState`: the sweep writes the table outside of any event, which Faust's
  tables do not allow by themselves;
* :func:`install_fetch_max_wait`: Faust's consumer waits up to 1.5 s per fetch, which the
  embedded broker takes in full.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import socket
import time
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
from faust.exceptions import PartitionsMismatch
from faust.streams import _current_event, current_event
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaDriverConsumer
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from deploy.kafka import (
    MAX_MESSAGE_BYTES,
    BrokerResetError,
    check_layout,
    faust_broker_kwargs,
    make_producer,
)
from deploy.process import one_blas_thread
from router.metrics import FeedbackMetrics, metrics_port, serve_metrics
from schemas.codec import DecodeError, decode, encode
from schemas.events import (
    TOPIC_EVENTS,
    DeadLetter,
    Event,
    ModelResponse,
    RewardEvent,
    RouteDecision,
)
from schemas.settings import Settings
from streams.join import JoinResult, RewardJoiner

__all__ = [
    "SOURCES",
    "FeedbackWorker",
    "RouteloopApp",
    "TableState",
    "app_id",
    "create_app",
    "install_fetch_max_wait",
    "install_true_highwaters",
    "probe_end_offsets",
    "run_feedback_worker",
]

log = logging.getLogger(__name__)

#: The short names of the topics the worker joins.
SOURCES = ("decisions", "responses", "rewards")
#: The name of the join table (its changelog topic is ``<app id>-join-changelog``).
TABLE_NAME = "join"
_MAX_DETAIL = 4_096
#: A dead letter keeps at most this many raw bytes, so that it fits the producer's request
#: limit whatever the topic let through.
MAX_DEAD_LETTER_RAW = 4 * 1024 * 1024
#: Seconds between checks that the broker still has the worker's topics.
BROKER_CHECK_S = 2.0
#: Longest a fetch of the source topics (and changelogs) may wait, in ms; Faust hard-codes
#: 1500. The embedded broker holds a fetch about that long even when records arrive
#: meanwhile, which made reward-to-snapshot freshness p50 1.6 s; 50 ms measured 0.88 s
#: (with the learner's 50 ms outcomes fetch). On Kafka it only adds idle fetches.
FETCH_MAX_WAIT_MS = 50
_STATS_EVERY_S = 60.0


def app_id(settings: Settings) -> str:
    """The Faust app id (and consumer group) of the feedback worker: it carries the topic prefix."""
    return f"{settings.topic_prefix}feedback"


def default_worker_id() -> str:
    """The host name: stable across restarts, which the RocksDB store's local state needs."""
    return socket.gethostname() or "worker"


class _StandInEvent:
    """What Faust's table code reads of the current event: ``message.topic``/``.partition``."""

    __slots__ = ("__weakref__", "message")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = SimpleNamespace(topic=topic, partition=partition, offset=None)


class TableState(MutableMapping[str, dict[str, Any]]):
    """The joiner's view of the Faust Table: writable from the sweep, active partitions only,
    and closed entries held back from the changelog until their outcome is acknowledged.

    Faust lets a table be modified only while an agent processes an event: the changelog
    partition (and the RocksDB store's partition) is the event's partition. The sweep runs
    in a timer, outside of any event. So every stored value carries its partition under
    ``"_p"``, and a write outside of an event (the sweep only rewrites or deletes existing
    keys) runs with a stand-in current event for the stored partition of ``source_topic``;
    the write itself is the table's own ``__setitem__``/``__delitem__``, which sends the
    changelog record.

    Inside :meth:`holding`, an entry the joiner closes (its join tombstone, which has
    ``"closed_at"``) is *held*: this worker reads it at once, so later events for the key
    meet the tombstone, but nothing reaches the table or its changelog until
    :meth:`release` (its outcome is acknowledged: write it) or :meth:`discard` (the produce
    failed: forget it, the changelog still has the pending entry, so a replay joins again).
    A tombstone in the changelog before its outcome is on the outcomes topic would turn a
    crash in between into a lost outcome.

    Iteration yields only the keys of partitions this worker actively owns
    (``active_partitions()``; None means all), so the sweep never closes the entries of a
    standby partition, nor stale entries of a partition that moved to another worker; and
    never a held key (closed already; it may not change until it is released).
    """

    def __init__(
        self,
        table: Any,
        source_topic: str,
        active_partitions: Callable[[], set[int] | None] = lambda: None,
    ) -> None:
        self.table = table
        self.source_topic = source_topic
        self.active_partitions = active_partitions
        self._held: dict[str, dict[str, Any]] = {}
        self._holding: list[str] | None = None

    # -- holding closed entries back --------------------------------------------------

    @contextlib.contextmanager
    def holding(self) -> Iterator[list[str]]:
        """Hold the entries closed inside the block; yields the list of their keys.

        The caller must :meth:`release` or :meth:`discard` every key it is given; if the
        block raises, its keys are discarded here.
        """
        keys: list[str] = []
        self._holding = keys
        try:
            yield keys
        except BaseException:
            for key in keys:
                self.discard(key)
            raise
        finally:
            self._holding = None

    def release(self, key: str) -> None:
        """Write a held entry to the table (and its changelog)."""
        value = self._held.pop(key, None)
        if value is not None:
            self._write(key, value)

    def discard(self, key: str) -> None:
        """Forget a held entry: the table keeps what its changelog has."""
        self._held.pop(key, None)

    def held(self) -> int:
        """The number of entries held back."""
        return len(self._held)

    # -- the mapping ------------------------------------------------------------------

    def _partition_of(self, key: str) -> int:
        event = current_event()
        if event is not None:
            return int(event.message.partition)
        stored = self.table.data.get(key)
        if stored is None or "_p" not in stored:
            raise RuntimeError(f"no partition known for key {key!r} outside of an event")
        return int(stored["_p"])

    @contextlib.contextmanager
    def _in_event_of(self, partition: int) -> Iterator[None]:
        event = current_event()
        if event is not None and event.message.partition == partition:
            yield
            return
        stand_in = _StandInEvent(self.source_topic, partition)
        token = _current_event.set(weakref.ref(stand_in))
        try:
            yield
        finally:
            _current_event.reset(token)

    def _write(self, key: str, value: dict[str, Any]) -> None:
        with self._in_event_of(value["_p"]):
            self.table[key] = value

    def _check_not_held(self, key: str) -> None:
        if key in self._held:
            raise RuntimeError(f"{key!r} is closed and held until its outcome is acknowledged")

    def __getitem__(self, key: str) -> dict[str, Any]:
        held = self._held.get(key)
        return self.table.data[key] if held is None else held

    def get(self, key: str, default: Any = None) -> Any:
        held = self._held.get(key)
        return self.table.data.get(key, default) if held is None else held

    def __contains__(self, key: object) -> bool:
        return key in self._held or key in self.table.data

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        self._check_not_held(key)
        value = {**value, "_p": self._partition_of(key)}
        if self._holding is not None and "closed_at" in value:  # a join tombstone (streams.join)
            self._held[key] = value
            self._holding.append(key)
        else:
            self._write(key, value)

    def __delitem__(self, key: str) -> None:
        self._check_not_held(key)
        with self._in_event_of(self._partition_of(key)):
            del self.table[key]

    def __iter__(self) -> Iterator[str]:
        store = self.table.data
        held = self._held
        active = self.active_partitions()
        for key in list(store.keys()):
            if key in held:
                continue
            if active is None:
                yield key
                continue
            value = store.get(key)
            if value is None:
                continue
            partition = value.get("_p")
            if partition is None or partition in active:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


class FeedbackWorker:
    """The worker's logic between Faust and the joiner: decode, join, emit."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        joiner: RewardJoiner,
        *,
        state: TableState,
        worker_name: str,
        outcomes_topic: Any,
        deadletter_topic: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.settings = settings
        self.joiner = joiner
        self.state = state
        self.worker_name = worker_name
        self.outcomes_topic = outcomes_topic
        self.deadletter_topic = deadletter_topic
        self.clock = clock
        self.short_names = {settings.topic(short): short for short in SOURCES}
        self.events = 0
        self.decode_errors = 0
        self.internal_errors = 0
        self.outcomes_sent = 0
        self.dead_letters_sent = 0
        self.sweeps = 0
        self._last_stats = clock()
        self.metrics = FeedbackMetrics()
        self._crash: asyncio.Task[None] | None = None
        # Messages held unacknowledged until their outcomes are: Faust tracks them weakly.
        self._held_messages: set[Any] = set()

    # -- the agent's work ---------------------------------------------------------------

    async def handle(self, topic: str, partition: int, offset: int, key: bytes | None, raw: bytes | None) -> None:
        """Process one message of a source topic (inside the agent's event)."""
        self.events += 1
        short = self.short_names.get(topic)
        if short is None:  # cannot happen: the agent subscribes to these topics only
            await self._dead_letter("unknown_topic", f"not a source topic: {topic}", raw, topic, partition, offset)
            return
        try:
            event = decode(TOPIC_EVENTS[short], raw)
        except DecodeError as exc:
            self.decode_errors += 1
            await self._dead_letter(exc.reason, exc.detail, raw, topic, partition, offset)
            return
        request_id = event.request_id  # type: ignore[attr-defined]
        if key is None or key != request_id.encode():
            # Keyed otherwise, the event may sit on another partition than its decision and
            # would never join; say so now instead of as an orphan a window later.
            shown = "no key" if key is None else f"key {key[:64]!r}"
            await self._dead_letter(
                "key_mismatch",
                f"{shown}, but request_id {request_id!r}: producers must key by request_id",
                raw,
                topic,
                partition,
                offset,
            )
            return
        source = [topic, partition, offset]
        now = self.clock()
        try:
            with self.state.holding() as closed:
                if isinstance(event, RouteDecision):
                    result = self.joiner.on_decision(event, now, source)
                elif isinstance(event, ModelResponse):
                    result = self.joiner.on_response(event, now, source)
                else:
                    assert isinstance(event, RewardEvent)
                    result = self.joiner.on_reward(event, now, source)
        except PartitionsMismatch as exc:
            # A misconfigured cluster (the changelog is not co-partitioned with the event
            # topics): nothing would join; stop loudly instead of dead-lettering everything.
            log.critical("%s", exc)
            await self.app.crash(exc)
            raise
        except Exception as exc:
            log.exception("the join failed on %s[%d]@%d", topic, partition, offset)
            self.internal_errors += 1
            await self._dead_letter("internal_error", repr(exc), raw, topic, partition, offset)
            return
        await self.emit(result, raw=raw, closed=closed)

    async def sweep(self) -> JoinResult | None:
        """Close expired entries and drop old tombstones (the timer's work)."""
        if getattr(self.app, "rebalancing", False) or getattr(self.app, "in_recovery", False):
            return None
        recovery = getattr(self.app.tables, "recovery", None)
        if recovery is not None and not recovery.completed.is_set():
            return None
        now = self.clock()
        with self.state.holding() as closed:
            result = self.joiner.expire(now)
        self.sweeps += 1
        await self.emit(result, closed=closed)
        if now - self._last_stats >= _STATS_EVERY_S:
            self._last_stats = now
            log.info("feedback worker: %s", self.stats())
        return result

    # -- output -------------------------------------------------------------------------

    async def emit(self, result: JoinResult, *, raw: bytes | None = None, closed: Sequence[str] = ()) -> None:
        """Produce a join result: the outcomes, then the rejects as dead letters.

        ``raw`` is the current message's bytes: a reject of the current message carries
        them; a reject of an event stored earlier carries its re-encoding. ``closed`` are
        the keys the join closed and the state holds: they are released once everything
        produced here is acknowledged (:meth:`_release_when_acked`).
        """
        sent: list[Awaitable[Any]] = []
        try:
            for outcome in result.outcomes:
                sent.append(await self.outcomes_topic.send(key=outcome.request_id.encode(), value=encode(outcome)))
                self.outcomes_sent += 1
                self.metrics.outcomes.labels(completion=outcome.completion).inc()
            current = current_event()
            here = None if current is None else [current.message.topic, current.message.partition, current.message.offset]
            for reject in result.rejects:
                source = reject.source if isinstance(reject.source, list) and len(reject.source) == 3 else None
                topic, partition, offset = source if source else (self._topic_of(reject.event), None, None)
                body = raw if raw is not None and source is not None and source == here else encode(reject.event)
                sent.append(await self._dead_letter(reject.reason, reject.detail, body, topic, partition, offset))
        except BaseException:
            for key in closed:  # nothing will release them
                self.state.discard(key)
            raise
        if closed:
            self._release_when_acked(list(closed), sent)

    def _release_when_acked(self, closed: list[str], sent: list[Awaitable[Any]]) -> None:
        """Release the held ``closed`` keys once all of ``sent`` is acknowledged; nothing awaits.

        Until then the current event (if any) holds one more reference on its message, so
        Faust acknowledges it, and commits its source offset, only after the release: the
        commit (every second, in Faust's commit loop, which flushes the producer first) is
        where a batch waits for its acks. A failed produce discards the keys instead; an
        event's message then never gets acknowledged, so the worker crashes for a restart
        that replays it (the sweep's keys just stay pending and close again next sweep).
        Faust's ``stream_publish_on_commit`` must stay off: it would hold the outcomes back
        until a commit that waits for them.
        """
        event = current_event()
        message = None if event is None else event.message
        if message is not None:
            message.incref()
            self._held_messages.add(message)
        acked = sent[0] if len(sent) == 1 else asyncio.gather(*sent)
        acked.add_done_callback(functools.partial(self._settle, closed, message))  # type: ignore[union-attr]

    def _settle(self, closed: list[str], message: Any, acked: asyncio.Future[Any]) -> None:
        self._held_messages.discard(message)
        failure: BaseException | None = asyncio.CancelledError() if acked.cancelled() else acked.exception()
        if failure is None:
            try:
                for key in closed:
                    self.state.release(key)
            except Exception as exc:  # noqa: BLE001 - handled like a failed produce
                failure = exc
        if failure is None:
            if message is not None and message.ack(self.app.consumer):
                self.app.sensors.on_message_out(message.tp, message.offset, message)
            return
        for key in closed:
            self.state.discard(key)
        if getattr(self.app, "should_stop", False):
            return  # stopping: the uncommitted events are replayed by the next worker
        log.error("outcomes or dead letters for %d closed joins not acknowledged: %r", len(closed), failure)
        if message is not None and self._crash is None:
            self._crash = asyncio.ensure_future(self.app.crash(failure))

    def _topic_of(self, event: Event) -> str:
        for short in SOURCES:
            if isinstance(event, TOPIC_EVENTS[short]):
                return self.settings.topic(short)
        return "unknown"

    async def _dead_letter(
        self,
        reason: str,
        detail: str,
        raw: bytes | None,
        topic: str,
        partition: int | None,
        offset: int | None,
    ) -> Awaitable[Any]:
        """Produce a dead letter; returns the produce's future (its acknowledgement)."""
        letter = DeadLetter(
            source_topic=topic[:256],
            partition=partition,
            offset=offset,
            reason=reason[:128],
            detail=detail[:_MAX_DETAIL],
            worker=self.worker_name[:128],
            raw_b64=base64.b64encode((raw or b"")[:MAX_DEAD_LETTER_RAW]).decode("ascii"),
            created_at=self.clock(),
        )
        if raw is not None and len(raw) > MAX_DEAD_LETTER_RAW:
            letter = letter.model_copy(update={"detail": (
                f"{letter.detail} (raw truncated to its first {MAX_DEAD_LETTER_RAW} of {len(raw)} bytes)"
            )[:_MAX_DETAIL]})
        key = None
        if partition is not None and offset is not None:
            key = f"{topic}/{partition}/{offset}".encode()
        sent = await self.deadletter_topic.send(key=key, value=encode(letter))
        self.dead_letters_sent += 1
        self.metrics.deadletters.labels(reason=letter.reason, worker="feedback").inc()
        if letter.reason == "late_reward":
            self.metrics.late_rewards.inc()
        return sent

    async def check_broker(self) -> None:
        """Raise BrokerResetError if a topic of the worker vanished or changed its partitions.

        A broker that came back empty (DESIGN.md) otherwise leaves this worker committing
        offsets that fail forever while its producer writes to recreated topics.
        """
        if getattr(self, "_probe", None) is None:
            self._probe = make_producer(self.settings)
            await self._probe.start()
        changelog = f"{app_id(self.settings)}-{TABLE_NAME}-changelog"
        await check_layout(self._probe.client, self.settings, (*SOURCES, "outcomes", "deadletter"),
                           self.worker_name, extra={changelog: self.settings.partitions})

    def stats(self) -> dict[str, Any]:
        """Worker and join counters, for logs and metrics."""
        return {
            "events": self.events,
            "decode_errors": self.decode_errors,
            "internal_errors": self.internal_errors,
            "outcomes_sent": self.outcomes_sent,
            "dead_letters_sent": self.dead_letters_sent,
            "sweeps": self.sweeps,
            "held": self.state.held(),
            **self.joiner.counters.as_dict(),
        }


async def probe_end_offsets(
    settings: Settings, ends: Mapping[Any, int], *, idle_ms: int = 300, timeout_s: float = 30.0
) -> dict[Any, int]:
    """The true end offsets of ``ends``' partitions, given the broker's possibly short ones.

    The embedded broker reports the first offset of a partition's last batch + 1 as its
    end (DESIGN.md), never more than the truth: so read from one before each reported end
    until a fetch comes back empty, and return the last offset seen + 1. ``ends`` maps
    ``(topic, partition)`` pairs (Faust's ``TP``, aiokafka's ``TopicPartition``) to the
    reported ends. A partition with a reported end > 0 has a record at end - 1, so the
    probe waits (up to ``timeout_s``) until each such partition returned one: a slow first
    fetch is not mistaken for the end. Raises ``TimeoutError`` if one never does.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from deploy.kafka import client_kwargs

    result = {tp: int(end) for tp, end in ends.items()}
    by_tp = {TopicPartition(tp[0], tp[1]): tp for tp in result if result[tp] > 0}
    if not by_tp:
        return result
    consumer = AIOKafkaConsumer(
        **client_kwargs(settings), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign(list(by_tp))
        for ktp, tp in by_tp.items():
            consumer.seek(ktp, result[tp] - 1)
        waiting = set(by_tp)
        deadline = time.monotonic() + timeout_s
        while True:
            batch = await consumer.getmany(timeout_ms=idle_ms)
            for ktp, records in batch.items():
                if records:
                    waiting.discard(ktp)
                    tp = by_tp[ktp]
                    result[tp] = max(result[tp], records[-1].offset + 1)
            if not any(batch.values()) and not waiting:
                break
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"no record at the reported end of {sorted(map(tuple, waiting))}")
    finally:
        await consumer.stop()
    return result


def install_true_highwaters(app: faust.App, settings: Settings) -> None:
    """Make Faust's table recovery read the changelogs to their true end on this broker.

    Faust stops recovering a changelog partition at its highwater (end offset - 1), which
    the embedded broker reports too low whenever the last batch holds several records:
    the recovered table then misses its newest writes (measured: one join in 300 lost on
    a restart). This wraps ``Recovery._build_highwaters`` (faust-streaming 0.15.3, a
    private method) so that the highwaters come from :func:`probe_end_offsets`. Harmless
    on a broker whose end offsets are right (the probe reads at most one record there).
    """
    recovery = app.tables.recovery
    original = recovery._build_highwaters

    async def build_highwaters(consumer: Any, tps: Any, destination: Any, title: str) -> None:
        await original(consumer, tps, destination, title)
        reported = {tp: destination[tp] + 1 for tp in tps if destination.get(tp) is not None}
        try:
            true_ends = await probe_end_offsets(settings, reported)
        except Exception as exc:  # noqa: BLE001 - keep Faust's figures rather than fail recovery
            log.warning("could not probe the true end of the %s changelogs: %r", title, exc)
            return
        for tp, end in true_ends.items():
            if end != reported[tp]:
                log.info("%s changelog %s: end offset %d, not %d as the broker says", title, tp, end, reported[tp])
                destination[tp] = end - 1

    recovery._build_highwaters = build_highwaters  # type: ignore[method-assign]


def install_fetch_max_wait() -> None:
    """Give the worker consumer of a :class:`RouteloopApp` ``fetch_max_wait_ms=FETCH_MAX_WAIT_MS``.

    faust-streaming 0.15.3 builds it in ``AIOKafkaConsumerThread._create_worker_consumer``
    with a literal ``fetch_max_wait_ms=1500``; this wraps that private method (once per
    process) and sets the value on the consumer it returns, which reads it when it starts.
    Other Faust apps in the process keep Faust's value.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(original, "routeloop", False):
        return

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        if isinstance(self.app, RouteloopApp):
            consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    create_worker_consumer.routeloop = True  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


class _FlowControl(FlowControlEvent):
    """Faust's stream flow control, minus one way of losing events.

    ``FlowControlEvent.resume()`` clears every stream queue, even when the flow is already
    running. Faust's recovery resumes the flow to read the changelogs, then resumes the
    source partitions, seeks them to the committed offsets (a broker round trip) and
    resumes the flow once more: that second resume throws away whatever the fetcher
    delivered in between, and those events are never processed (their offsets are never
    committed either, so the worker's commits stall for good). Measured here on most
    restarts with a backlog: 1 to 12 rewards in 300 silently dropped.

    Here only a real suspended -> running transition clears the queues (what the clearing
    is for: events buffered before a rebalance are fetched again from the committed
    offsets). Events fetched just before the seek may then be processed twice, which
    at-least-once processing allows and the joiner recognises as duplicates.
    """

    def resume(self) -> None:
        was_suspended = self._suspend.is_set()
        self._suspend.clear()
        self._resume.set()
        if was_suspended:
            self.clear()


class _AtLeastOnceConsumer(AIOKafkaDriverConsumer):
    """Faust's aiokafka consumer, minus committing past a message still being processed.

    Faust commits, per partition, the first run of consecutive acknowledged offsets
    (``Consumer._new_offset``). It withholds the commit only when that run starts more
    than one offset above the committed offset, and not at all when nothing is committed
    yet (or 0 is). A message whose acknowledgement waits (here: a join's closing event,
    until its outcome is acknowledged) is then committed over as soon as later ones are
    acknowledged, and a kill -9 before it is acknowledged loses it: measured, 45 of 100
    closing events on 5 of 9 restarts (faust-streaming issue #606, open PR #707).

    Here a partition's commit stops at its lowest offset that a stream took and has not
    acknowledged (Faust tracks those in ``_unacked_messages``); below that, Faust's own
    rule applies, gaps (compacted or transaction-marker offsets) included.
    """

    def _new_offset(self, tp: Any) -> int | None:
        committed = self._committed_offset[tp] or 0
        pending = [m.offset for m in list(self._unacked_messages)
                   if m.tp == tp and not m.acked and m.offset >= committed]  # fmt: skip
        if not pending:
            return super()._new_offset(tp)
        head = min(pending)
        acked = self._acked[tp]
        later = [offset for offset in acked if offset >= head]
        acked[:] = [offset for offset in acked if offset < head]
        try:
            return super()._new_offset(tp) if acked else None
        finally:
            acked.extend(later)  # committable once the head is acknowledged


class RouteloopApp(faust.App):
    """``faust.App`` with the fixes of :class:`_FlowControl` and :class:`_AtLeastOnceConsumer`
    (faust-streaming 0.15.3)."""

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return _FlowControl(loop=self.loop)

    def _new_transport(self) -> Any:
        transport = super()._new_transport()
        transport.Consumer = _AtLeastOnceConsumer
        return transport


def create_app(
    settings: Settings,
    *,
    worker_id: str | None = None,
    tombstone_ttl: float | None = None,
    sweep_interval_s: float | None = None,
    **faust_overrides: Any,
) -> faust.App:
    """The feedback worker's Faust app (not started); its logic is ``app.feedback``.

    ``worker_id`` names the worker in dead letters and its data directory (default: the
    host name; give two workers on one host different ids). ``tombstone_ttl`` defaults to
    ten reward windows, ``sweep_interval_s`` to ``min(1, reward_wait_s / 4)``.
    ``faust_overrides`` are passed to ``faust.App`` last (e.g. ``web_enabled=True``).
    """
    worker_id = worker_id or default_worker_id()
    ident = app_id(settings)
    session_s = settings.session_timeout_ms / 1000.0
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    conf: dict[str, Any] = {
        **faust_broker_kwargs(settings),
        "store": settings.store,
        "datadir": str(data_dir / f"{ident}@{worker_id}"),
        # A group join on the embedded broker waits about half the session timeout.
        "broker_session_timeout": session_s,
        "broker_heartbeat_interval": settings.heartbeat_interval_ms / 1000.0,
        "broker_rebalance_timeout": max(session_s, 6.0),
        "broker_commit_interval": 1.0,
        "consumer_auto_offset_reset": "earliest",
        # No idempotent producer (refused by the broker; Faust only asks for it with
        # exactly_once), and every write acknowledged by all in-sync replicas.
        "processing_guarantee": "at_least_once",
        "producer_acks": -1,
        # The leader topic serves only on_leader timers; the broker needs no extra topic.
        "topic_disable_leader": True,
        # Must stay on: Faust creates the table's changelog topic itself.
        "topic_allow_declare": True,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "web_enabled": False,
        # Dead letters carry the raw event: room for one over the event size limit.
        "producer_max_request_size": MAX_MESSAGE_BYTES,
        # aiokafka's 16 KiB batch holds ~5 outcomes (2.8 KB with their features): every full
        # batch is another produce round trip (measured in the router, same sizes).
        "producer_max_batch_size": 512 * 1024,
    }
    conf.update(faust_overrides)
    app = RouteloopApp(ident, **conf)

    source_topic = app.topic(
        *(settings.topic(short) for short in SOURCES),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    outcomes_topic = app.topic(
        settings.topic("outcomes"), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", partitions=1,
    )  # fmt: skip
    deadletter_topic = app.topic(
        settings.topic("deadletter"), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", partitions=1,
    )  # fmt: skip
    table = app.Table(
        TABLE_NAME,
        key_type=str,
        value_type=None,  # both serialised as JSON (Faust's fallback)
        partitions=settings.partitions,
        default=None,
        help="Pending joins and tombstones by request_id (streams.join).",
    )
    decisions_name = settings.topic("decisions")

    def active_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == decisions_name}

    state = TableState(table, settings.topic("decisions"), active_partitions)
    joiner = RewardJoiner.from_settings(state, settings, tombstone_ttl=tombstone_ttl)
    worker = FeedbackWorker(
        app,
        settings,
        joiner,
        state=state,
        worker_name=f"feedback@{worker_id}",
        outcomes_topic=outcomes_topic,
        deadletter_topic=deadletter_topic,
    )
    install_true_highwaters(app, settings)
    install_fetch_max_wait()
    app.feedback = worker  # type: ignore[attr-defined]
    app.join_table = table  # type: ignore[attr-defined]

    @app.agent(source_topic, name="routeloop.feedback.join")
    async def join(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            await worker.handle(message.topic, message.partition, message.offset, message.key, message.value)

    interval = sweep_interval_s if sweep_interval_s is not None else min(1.0, settings.reward_wait_s / 4.0)

    @app.timer(BROKER_CHECK_S, name="routeloop.feedback.broker_check")
    async def broker_check() -> None:
        try:
            await worker.check_broker()
        except BrokerResetError as exc:
            log.critical("%s", exc)
            await app.crash(exc)

    @app.timer(interval, name="routeloop.feedback.sweep")
    async def sweep() -> None:
        try:
            await worker.sweep()
        except Exception:
            log.exception("the join sweep failed")

    return app


def run_feedback_worker(settings: Settings, *, worker_id: str | None = None, **faust_overrides: Any) -> None:
    """Run the feedback worker in the foreground until SIGTERM or SIGINT (``routeloop worker feedback``).

    Returns after a clean stop; raises ``SystemExit`` with a non-zero code if the worker
    crashed (e.g. a changelog topic that is not co-partitioned with the event topics).
    Logging goes to stderr at ``settings.log_level``.
    """
    app = create_app(settings, worker_id=worker_id, **faust_overrides)
    one_blas_thread()
    # /metrics on http_port + 2 (router.metrics), in a thread of its own: Faust's web server stays off.
    metrics_server = serve_metrics(app.feedback.metrics.registry, metrics_port(settings, "feedback"))
    worker = faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        redirect_stdouts=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


if __name__ == "__main__":  # python -m streams.app: settings from ROUTELOOP_* variables
    run_feedback_worker(Settings.load(), worker_id=os.environ.get("ROUTELOOP_WORKER_ID"))
