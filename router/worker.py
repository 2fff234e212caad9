"""The routing worker: requests in, decisions out, with the model hot-swapped from snapshots.

``Router`` is the part without Kafka: it holds the current policy, featurises a batch of
requests and decides each. ``RoutingWorker`` runs it on the requests topic and follows the
snapshots topic::

    router = Router(settings, featuriser_from_url(settings.featuriser))
    decisions, rejects = router.route(requests)
    router.apply_snapshot(frame)     # decode, verify, swap in atomically; keeps the last good one

    await RoutingWorker(settings).run(stop_event)
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np
from aiokafka import TopicPartition

from deploy.kafka import make_consumer, make_producer
from router.featurise import Featuriser, featuriser_from_url
from router.policy import RoutingPolicy, make_policy
from router.snapshot import SnapshotError, decode_snapshot
from schemas import DeadLetter, DecodeError, RouteDecision, RouteRequest, decode, encode
from schemas.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class RouterStats:
    decisions: int = 0
    rejected: int = 0
    snapshots_applied: int = 0
    snapshots_refused: int = 0
    snapshots_stale: int = 0
    refusals: dict[str, int] = field(default_factory=dict)


class Router:
    """Decides requests with the newest verified snapshot, or with the prior before one exists."""

    def __init__(self, settings: Settings, featuriser: Featuriser, seed: int | None = None) -> None:
        if not settings.models:
            raise ValueError("no candidate models: set ROUTELOOP_MODELS (comma-separated)")
        self.settings = settings
        self.featuriser = featuriser
        self.key = settings.snapshot_key.encode() if settings.snapshot_key else None
        self.rng = np.random.default_rng(seed)
        self.policy: RoutingPolicy = make_policy(
            settings.policy, arms=list(settings.models), dim=featuriser.dim, tau=settings.tau)
        self.snapshot_version = 0
        self.stats = RouterStats()

    @property
    def cold_start(self) -> bool:
        return self.snapshot_version == 0

    def apply_snapshot(self, frame: bytes) -> bool:
        """Verify and swap in a snapshot frame; on any refusal keep routing with the current model."""
        try:
            snapshot = decode_snapshot(frame, key=self.key)
            if snapshot.header.version <= self.snapshot_version:
                self.stats.snapshots_stale += 1
                return False
            if snapshot.header.dim != self.featuriser.dim:
                raise SnapshotError("bad_dimension", f"snapshot dim {snapshot.header.dim}, "
                                    f"featuriser {self.featuriser.name} dim {self.featuriser.dim}")
            policy = snapshot.policy()
            policy.prepare()  # derive before the swap, so no decision pays for it
        except SnapshotError as exc:
            self.stats.snapshots_refused += 1
            self.stats.refusals[exc.reason] = self.stats.refusals.get(exc.reason, 0) + 1
            log.warning("snapshot refused (%s); routing on with version %d", exc, self.snapshot_version)
            return False
        self.policy, self.snapshot_version = policy, snapshot.header.version  # the atomic swap
        self.stats.snapshots_applied += 1
        return True

    def _features(self, requests: list[RouteRequest]) -> np.ndarray:
        X = np.empty((len(requests), self.featuriser.dim), dtype=np.float32)
        to_encode = [i for i, r in enumerate(requests) if r.embedding is None]
        if to_encode:
            X[to_encode] = self.featuriser.encode([requests[i].prompt for i in to_encode])
        for i, r in enumerate(requests):
            if r.embedding is not None:
                X[i] = r.embedding
        return X

    def check(self, request: RouteRequest) -> np.ndarray:
        """The arms this request may use; raises DecodeError for a request that cannot be routed."""
        if request.embedding is not None and request.embedding.shape[0] != self.featuriser.dim:
            raise DecodeError("bad_dimension", f"embedding has {request.embedding.shape[0]} "
                              f"dimensions, {self.featuriser.name} has {self.featuriser.dim}")
        arms = self.policy.arms
        if request.candidates is None:
            return np.ones(len(arms), dtype=bool)
        allowed = np.isin(arms, request.candidates)
        if not allowed.any():
            raise DecodeError("unknown_model", f"none of the candidates {request.candidates[:5]} is a known model")
        return allowed

    def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        """Decide a batch of requests (already checked)."""
        if not requests:
            return []
        policy, version = self.policy, self.snapshot_version  # one model for the whole batch
        X = self._features(requests)
        decisions = []
        for request, x in zip(requests, X):
            preference = request.preference or self.settings.default_preference
            choice = policy.decide(x, preference.quality, self.check(request), rng=self.rng)
            decisions.append(RouteDecision(
                request_id=request.request_id,
                model=policy.arms[choice.arm],
                propensity=choice.propensity,
                distribution={a: float(p) for a, p in zip(policy.arms, choice.distribution) if p > 0},
                preference=preference,
                features=x,
                featuriser=self.featuriser.name,
                policy=policy.name,
                snapshot_version=version,
                cold_start=version == 0,
            ))
        self.stats.decisions += len(decisions)
        return decisions


class RoutingWorker:
    """Runs a Router on the requests topic; follows the snapshots topic from its beginning."""

    def __init__(self, settings: Settings, featuriser: Featuriser | None = None,
                 worker_id: str = "router", max_batch: int = 64) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.router = Router(settings, featuriser or featuriser_from_url(settings.featuriser))
        self.max_batch = max_batch

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        producer = make_producer(s)
        requests = make_consumer(s, s.topic("requests"), group_id=f"{s.topic_prefix}router",
                                 enable_auto_commit=False, auto_offset_reset="earliest")
        snapshots = make_consumer(s, group_id=None, enable_auto_commit=False)
        await producer.start()
        await snapshots.start()
        await requests.start()
        try:
            part = TopicPartition(s.topic("snapshots"), 0)
            snapshots.assign([part])
            await snapshots.seek_to_beginning(part)
            tasks = [asyncio.create_task(self._follow_snapshots(snapshots, stop)),
                     asyncio.create_task(self._route_requests(requests, producer, stop))]
            done, _ = await asyncio.wait([*tasks, asyncio.create_task(stop.wait())],
                                         return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            for task in tasks:
                task.cancel()
            for task in done:
                if task in tasks and not task.cancelled() and task.exception():
                    raise task.exception()
        finally:
            await requests.stop()
            await snapshots.stop()
            await producer.stop()

    async def _follow_snapshots(self, consumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                # Only the newest frame of a batch matters; older ones would be stale anyway.
                for record in reversed(records):
                    if self.router.apply_snapshot(record.value):
                        log.info("applied snapshot version %d", self.router.snapshot_version)
                        break

    async def _route_requests(self, consumer, producer, stop: asyncio.Event) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=self.max_batch)
            good: list[RouteRequest] = []
            pending = []
            for records in batches.values():
                for record in records:
                    try:
                        request = decode(RouteRequest, record.value)
                        self.router.check(request)
                        good.append(request)
                    except DecodeError as exc:
                        self.router.stats.rejected += 1
                        pending.append(await producer.send(s.topic("deadletter"), encode(
                            DeadLetter.for_record(record, exc.reason, exc.detail, self.worker_id))))
            if good:
                # Encoding is CPU-bound and releases the GIL: off the loop, so heartbeats go on.
                decisions = await loop.run_in_executor(None, self.router.route, good)
                for decision in decisions:
                    pending.append(await producer.send(
                        s.topic("decisions"), encode(decision), key=decision.request_id.encode()))
            if pending:
                await asyncio.gather(*pending)
            if batches:
                await consumer.commit()  # at-least-once: after every decision is acknowledged


def run_routing_worker(settings: Settings) -> None:
    """Run a routing worker in the foreground until SIGINT/SIGTERM."""
    from deploy.process import run_until_signalled

    run_until_signalled(RoutingWorker(settings).run)
