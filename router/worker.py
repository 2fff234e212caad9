"""The routing worker: requests in, decisions out, with the model hot-swapped from snapshots.

``Router`` is the part without Kafka: it holds the current policy, featurises a batch of
requests and decides each. ``RoutingWorker`` runs it on the requests topic, follows the
snapshots topic and, unless ``http_port`` is 0, serves the HTTP API of :mod:`router.http`
on that port (route, rewards, model, health, metrics)::

    router = Router(settings, featuriser_from_url(settings.featuriser))
    decisions = router.route(requests)
    router.apply_snapshot(frame)     # decode, verify, swap in atomically; keeps the last good one
    router.apply_specs([spec])       # a model added, removed or repriced (router.registry)

    worker = RoutingWorker(settings)
    await worker.run(stop_event)                 # until stop_event is set
    decision = await worker.decide(request)      # meanwhile: one request, its decision produced
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from deploy.kafka import BrokerResetError, LogGuard, check_layout, make_consumer, make_producer
from router.featurise import Featuriser, featuriser_from_url
from router.http import serve
from router.metrics import RouterMetrics, metrics_port
from router.policy import RoutingPolicy, make_policy
from router.registry import ModelRegistry
from router.snapshot import SnapshotError, decode_snapshot, verification_keys
from schemas import (DeadLetter, DecodeError, Event, ModelSpec, Preference, RouteDecision, RouteRequest,
                     decode, encode)
from schemas.events import _encode_vector
from schemas.settings import Settings

log = logging.getLogger(__name__)

#: A requests loop that has not polled for this long counts as stalled (health check).
STALL_AFTER_S = 15.0
#: How long the health check waits for the broker to answer a metadata request.
BROKER_PROBE_TIMEOUT_S = 3.0
#: An HTTP caller waits at most this long for the broker's acknowledgement, then gets a 503.
PRODUCE_TIMEOUT_S = 4.0
#: At most this many HTTP calls wait for the broker at once; the next ones get a 503 at once.
MAX_HTTP_WAITING = 256
#: Seconds between checks that the broker still has the topics (it may come back empty).
LAYOUT_CHECK_S = 5.0
#: The topics a routing worker reads or writes.
ROUTER_TOPICS = ("requests", "decisions", "responses", "rewards", "snapshots", "models", "deadletter")
#: Longest a fetch may wait for records, in ms. The embedded broker holds a fetch for about
#: this long even when records arrive meanwhile (aiokafka's 500 ms default gave a p50 of
#: 128 ms from request to fetch at 100 requests/s; 10 ms gives 3 ms). On Kafka a fetch returns
#: as soon as a record is there, so a short wait only adds idle fetches (100/s here).
REQUEST_FETCH_WAIT_MS = 10
#: The same for the snapshots topic: part of the reward-to-applied-snapshot time.
SNAPSHOT_FETCH_WAIT_MS = 50
#: Acknowledged request offsets are committed at most this often (and when the worker stops):
#: a commit per batch cost a round trip per batch, most of the router's and the broker's CPU
#: at low load. A crash re-decides at most this much more traffic than with per-batch commits
#: (the join refuses each second decision as ``duplicate_decision``): still at-least-once, and
#: an offset is still committed only once every record its batch produced is acknowledged.
COMMIT_INTERVAL_S = 0.2
#: The producer's batch per partition (aiokafka's max_batch_size): a whole routed batch of
#: decisions (64 of about 2.7 KB) fits, and it stays under Kafka's default 1 MB message limit.
PRODUCER_BATCH_BYTES = 512 * 1024


@dataclass
class _InFlight:
    """One routed batch whose records are on their way to the broker, its offsets uncommitted."""

    pending: list            # the futures of every record it produced (decisions, dead letters)
    offsets: dict            # TopicPartition -> the next offset to commit once they are acknowledged
    fetched: float           # when the batch was fetched (decision latency)
    decisions: int


class BrokerUnavailable(KafkaError):
    """The broker did not acknowledge in time, or too many callers already wait for it (HTTP 503)."""


@dataclass
class RouterStats:
    decisions: int = 0
    rejected: int = 0
    snapshots_applied: int = 0
    snapshots_refused: int = 0
    snapshots_stale: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    #: Request-offset commits that failed (e.g. the group rebalanced during an outage): the
    #: uncommitted requests are decided again, and the join refuses the second decisions.
    commit_failures: int = 0
    #: HTTP calls answered 503 because the broker did not acknowledge (or too many waited).
    unavailable: int = 0
    #: Snapshot frames not looked at: a newer frame of the same fetch was applied.
    snapshots_skipped: int = 0
    #: Models-topic records that are not a ModelSpec (logged and counted, never applied).
    specs_refused: int = 0


@dataclass(frozen=True)
class RoutingModel:
    """The policy a router decides with, the snapshot it came from (version 0: the prior) and
    the registry's view of its arms.

    One object, swapped in by one assignment: a decision never pairs a policy with
    another snapshot's version or registry, even while one is applied on another thread.
    """

    policy: RoutingPolicy
    #: (K,) bool: the arms the registry lets the router choose.
    enabled: np.ndarray
    #: Each arm's registered price (None: none), as decisions carry it.
    prices: tuple[float | None, ...]
    version: int = 0
    #: The snapshot's creation time (the learner's clock), None for the prior.
    created_at: float | None = None


class Router:
    """Decides requests with the newest verified snapshot, or with the prior before one exists."""

    def __init__(self, settings: Settings, featuriser: Featuriser, seed: int | None = None,
                 metrics: RouterMetrics | None = None) -> None:
        if not settings.models:
            raise ValueError("no candidate models: set ROUTELOOP_MODELS (comma-separated)")
        self.settings = settings
        self.featuriser = featuriser
        self.keys = verification_keys(settings)
        self.rng = np.random.default_rng(seed)
        self.stats = RouterStats()
        self.metrics = metrics or RouterMetrics()
        self.registry = ModelRegistry(settings.models)
        #: The newest snapshot's policy as decoded (or the prior): the registry's changes are
        #: applied to a clone of it, so that a later change starts again from what was learned.
        self._learned: RoutingPolicy = make_policy(
            settings.policy, arms=list(settings.models), dim=featuriser.dim, tau=settings.tau)
        self.model = self._configured(self._learned, 0, None)
        self.metrics.snapshot_age.set_function(lambda: math.nan if self.snapshot_age_s is None
                                               else self.snapshot_age_s)
        self._decision_counters: dict[str, object] = {}  # model -> its labelled counter
        self._checked_model: RoutingModel | None = None  # the last model _check_model passed

    @property
    def policy(self) -> RoutingPolicy:
        return self.model.policy

    @property
    def snapshot_version(self) -> int:
        return self.model.version

    @property
    def cold_start(self) -> bool:
        return self.model.version == 0

    @property
    def snapshot_age_s(self) -> float | None:
        """Seconds since the snapshot in use was created; None before any snapshot."""
        created = self.model.created_at
        return None if created is None else max(0.0, time.time() - created)

    def _configured(self, learned: RoutingPolicy, version: int, created_at: float | None) -> RoutingModel:
        """The model to swap in: ``learned`` with the registry applied, derived for decisions."""
        policy = self.registry.configure(learned)
        policy.prepare()  # derive before the swap, so no decision pays for it
        prices = tuple(self.registry.price(arm) for arm in policy.arms)
        for arm, on, price in zip(policy.arms, self.registry.mask(policy.arms), prices):
            self.metrics.model_enabled.labels(model=arm).set(int(on))
            self.metrics.model_price.labels(model=arm).set(math.nan if price is None else price)
        return RoutingModel(policy, self.registry.mask(policy.arms), prices, version, created_at)

    def apply_specs(self, specs: list[ModelSpec]) -> bool:
        """Apply models-topic records in order; True if the model in use changed."""
        changed = False
        for spec in specs:
            changed |= self.registry.apply(spec)
        if changed:
            current = self.model
            self.model = self._configured(self._learned, current.version, current.created_at)  # the swap
            log.info("registry: routing to %s", ", ".join(
                f"{arm}" + ("" if price is None else f" (price {price:g})")
                for arm, on, price in zip(self.model.policy.arms, self.model.enabled, self.model.prices) if on))
        return changed

    def apply_snapshot(self, frame: bytes) -> bool:
        """Verify and swap in a snapshot frame; on any refusal keep routing with the current model."""
        try:
            snapshot = decode_snapshot(frame, key=self.keys)
            if snapshot.header.version <= self.model.version:
                self.stats.snapshots_stale += 1
                self.metrics.snapshots_stale.inc()
                return False
            if snapshot.header.dim != self.featuriser.dim:
                raise SnapshotError("bad_dimension", f"snapshot dim {snapshot.header.dim}, "
                                    f"featuriser {self.featuriser.name} dim {self.featuriser.dim}")
            learned = snapshot.policy()
            model = self._configured(learned, snapshot.header.version, snapshot.header.created_at)
        except SnapshotError as exc:
            self.stats.snapshots_refused += 1
            self.stats.refusals[exc.reason] = self.stats.refusals.get(exc.reason, 0) + 1
            self.metrics.snapshots_refused.labels(reason=exc.reason).inc()
            log.warning("snapshot refused (%s); routing on with version %d", exc, self.model.version)
            return False
        self._learned, self.model = learned, model  # the swap
        self.stats.snapshots_applied += 1
        self.metrics.snapshots_applied.inc()
        self.metrics.snapshot_version.set(snapshot.header.version)
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

    def _check_model(self, model: RoutingModel) -> None:
        """Refuse to route with a model whose decisions RouteDecision would not validate (arm,
        policy and featuriser names, prices, version, dimension): one decision per arm is
        validated in full, once per model swapped in; ``route`` then builds them unvalidated."""
        if model is self._checked_model:
            return
        policy = model.policy
        share = 1.0 / max(len(policy.arms), 1)
        features = np.zeros(self.featuriser.dim, dtype=np.float32)
        for arm, price in zip(policy.arms, model.prices, strict=True):
            RouteDecision(request_id="check", model=arm, propensity=share,
                          distribution=dict.fromkeys(policy.arms, share),
                          preference=Preference(quality=1.0, cost=0.0), features=features,
                          featuriser=self.featuriser.name, policy=policy.name,
                          snapshot_version=model.version, cold_start=model.version == 0,
                          price=price, created_at=0.0)
        self._checked_model = model

    def check(self, request: RouteRequest, model: RoutingModel | None = None) -> np.ndarray:
        """The arms of ``model`` (default: the current one) this request may use.

        Raises DecodeError for a request that cannot be routed.
        """
        if request.embedding is not None and request.embedding.shape[0] != self.featuriser.dim:
            raise DecodeError("bad_dimension", f"embedding has {request.embedding.shape[0]} "
                              f"dimensions, {self.featuriser.name} has {self.featuriser.dim}")
        model = model or self.model
        if request.candidates is None:
            allowed = model.enabled
        else:
            allowed = model.enabled & np.isin(model.policy.arms, request.candidates)
        if not allowed.any():
            which = "registry" if request.candidates is None else f"candidates {request.candidates[:5]}"
            raise DecodeError("unknown_model", f"no model of the {which} is an enabled model")
        return allowed

    def route(self, requests: list[RouteRequest]) -> list[RouteDecision]:
        """Decide a batch of requests (already checked).

        One featuriser call for the whole batch, one decision per request, and one greedy
        pass per distinct (preference, candidates) in the batch for the exploration count.
        """
        if not requests:
            return []
        model = self.model  # one model for the whole batch
        policy = model.policy
        self._check_model(model)
        X = self._features(requests)
        if not np.isfinite(X).all():
            raise ValueError(f"{self.featuriser.name} gave a vector with NaN or infinity")
        # Decisions are built without pydantic's validation (model_construct, a third of the
        # cost of validating each one): every field is already valid, being either a validated
        # request's, or checked here (vectors), per decision (distribution) or per model.
        construct = RouteDecision.model_construct
        featuriser = self.featuriser.name
        decisions = []
        chosen = np.empty(len(requests), dtype=np.intp)
        groups: dict[tuple[float, bytes], tuple[np.ndarray, list[int]]] = {}
        default = self.settings.default_preference
        counters = self._decision_counters
        for i, (request, x) in enumerate(zip(requests, X)):
            preference = request.preference or default
            allowed = self.check(request, model)
            choice = policy.decide(x, preference.quality, allowed, rng=self.rng)
            arm = policy.arms[choice.arm]
            chosen[i] = choice.arm
            groups.setdefault((preference.quality, allowed.tobytes()), (allowed, []))[1].append(i)
            probabilities = choice.distribution.tolist()
            propensity = probabilities[choice.arm]
            distribution = {a: p for a, p in zip(policy.arms, probabilities) if p > 0}
            # What RouteDecision's validation would refuse of the policy's output (the rest
            # is checked once per model and batch above), and NaN or negative probabilities
            # of the arms not drawn, which the distribution leaves out: then nothing gets through.
            if not 0.0 < propensity <= 1.0 or not all(0.0 <= p <= 1.0 for p in probabilities):
                raise ValueError(f"the policy's action distribution is not one: {probabilities}")
            decisions.append(construct(
                request_id=request.request_id,
                model=arm,
                propensity=propensity,
                distribution=distribution,
                preference=preference,
                features=x,
                featuriser=featuriser,
                policy=policy.name,
                snapshot_version=model.version,
                cold_start=model.version == 0,
                price=model.prices[choice.arm],
                created_at=time.time(),
            ))
            counter = counters.get(arm)
            if counter is None:
                counter = counters[arm] = self.metrics.decisions.labels(model=arm)
            counter.inc()
        explorations = 0
        for (w_quality, _), (allowed, rows) in groups.items():
            explorations += int((policy.greedy(X[rows], w_quality, allowed) != chosen[rows]).sum())
        if explorations:
            self.metrics.explorations.inc(explorations)
        self.stats.decisions += len(decisions)
        return decisions


#: The fields encode_decision writes, in RouteDecision's order. Should the event change,
#: encode_decision falls back to schemas.encode until it is brought up to date.
_DECISION_FIELDS = ("request_id", "model", "propensity", "distribution", "preference", "features",
                    "featuriser", "policy", "snapshot_version", "cold_start", "price", "created_at")
_FAST_ENCODE = (tuple(RouteDecision.model_fields) == _DECISION_FIELDS
                and tuple(Preference.model_fields) == ("quality", "cost"))


def encode_decision(decision: RouteDecision) -> bytes:
    """``schemas.encode(decision)``, byte for byte, at a third of the cost: the JSON object is
    built here, in the model's field order, instead of by pydantic's serialiser."""
    if not _FAST_ENCODE:
        return encode(decision)
    preference = decision.preference
    value = {
        "request_id": decision.request_id,
        "model": decision.model,
        "propensity": decision.propensity,
        "distribution": decision.distribution,
        "preference": {"quality": preference.quality, "cost": preference.cost},
        "features": _encode_vector(decision.features),
        "featuriser": decision.featuriser,
        "policy": decision.policy,
        "snapshot_version": decision.snapshot_version,
        "cold_start": decision.cold_start,
    }
    if decision.price is not None:
        value["price"] = decision.price
    value["created_at"] = decision.created_at
    return orjson.dumps(value)


class RoutingWorker:
    """Runs a Router on the requests topic; follows the snapshots topic from its beginning.

    While :meth:`run` runs, :meth:`decide` and :meth:`publish` serve the HTTP API, and
    :meth:`stalled` / :meth:`broker_problem` its health check.
    """

    def __init__(self, settings: Settings, featuriser: Featuriser | None = None,
                 worker_id: str = "router", max_batch: int = 64, freeze_gc: bool = False) -> None:
        self.settings = settings
        #: Once started, move every object of the start-up to the collector's permanent
        #: generation (gc.freeze): a full collection then scans only what traffic created.
        #: Process-wide, so only for a process that is this worker (run_routing_worker).
        self.freeze_gc = freeze_gc
        self.worker_id = worker_id
        self.router = Router(settings, featuriser or featuriser_from_url(settings.featuriser))
        self.metrics = self.router.metrics
        self.max_batch = max_batch
        #: The HTTP API's port, None when off (``http_port`` 0).
        self.http_port = metrics_port(settings, "router")
        self._producer: AIOKafkaProducer | None = None
        # One routing thread for Kafka and HTTP alike: the policy's rng and the featuriser are
        # not thread-safe, and featurising is CPU-bound work that must stay off the event loop
        # unless the featuriser is cheap: then the event loop's thread is the routing thread.
        self._executor: ThreadPoolExecutor | None = None
        self._inline = bool(getattr(self.router.featuriser, "cheap", False))
        self._tasks: list[asyncio.Task] = []
        self._last_poll: float | None = None
        self._assigned: set[TopicPartition] = set()
        self._guard = LogGuard(worker_id)
        #: Offsets whose batches are acknowledged and not yet committed, and the last commit.
        self._acknowledged: dict[TopicPartition, int] = {}
        self._last_commit = 0.0
        #: Snapshots are decoded, verified and prepared here, off the event loop; the swap is
        #: one assignment (Router.model), so the routing thread never sees half a model.
        self._snapshot_executor: ThreadPoolExecutor | None = None
        #: HTTP calls now waiting for the broker, and whether the last one timed out (then new
        #: ones fail at once until the broker answers a metadata request again).
        self._waiting = 0
        self._broker_down_since: float | None = None
        #: Why the worker stopped because the broker came back empty (None otherwise).
        self.reset: BrokerResetError | None = None

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        # No linger: a routed batch's decisions are appended in one event-loop turn, so they
        # travel as one produce request anyway; lingering would only add to each one's latency.
        # That needs a partition's share of a batch to fit one producer batch: aiokafka's
        # default (16 KiB, six decisions of 2.7 KB) made a send wait for the sender to drain
        # the full one, and a routed batch of 64 took several produce round trips.
        producer = make_producer(s, linger_ms=0, max_batch_size=PRODUCER_BATCH_BYTES)
        requests = make_consumer(s, s.topic("requests"), group_id=f"{s.topic_prefix}router",
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 fetch_max_wait_ms=REQUEST_FETCH_WAIT_MS)
        snapshots = make_consumer(s, group_id=None, enable_auto_commit=False,
                                  fetch_max_wait_ms=SNAPSHOT_FETCH_WAIT_MS)
        await producer.start()
        await snapshots.start()
        await requests.start()
        http = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routing")
        self._snapshot_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshots")
        try:
            # One consumer follows the snapshots and the models (registry) topics, from their
            # beginnings: both kinds of change are applied on one thread, in the order read.
            parts = [TopicPartition(s.topic("snapshots"), 0), TopicPartition(s.topic("models"), 0)]
            snapshots.assign(parts)
            await snapshots.seek_to_beginning(*parts)
            self._producer = producer
            self._tasks = [asyncio.create_task(self._follow_snapshots(snapshots, stop)),
                           asyncio.create_task(self._route_requests(requests, producer, stop)),
                           asyncio.create_task(self._watch_broker(producer))]
            if self.http_port is not None:
                http = await serve(self, self.http_port)
                log.info("HTTP API on port %d", self.http_port)
            if self.freeze_gc:
                # The modules, the policy and the clients are ~160k objects that live as long
                # as the process: each full collection scanned them all, 30-160 ms with the
                # event loop stopped (measured), the p99 of request-to-decision latency.
                gc.collect()
                gc.freeze()
            done, _ = await asyncio.wait([*self._tasks, asyncio.create_task(stop.wait())],
                                         return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for task in done:
                if task in self._tasks and not task.cancelled() and task.exception():
                    if isinstance(task.exception(), BrokerResetError):
                        self.reset = task.exception()
                        log.critical("%s", self.reset)
                    raise task.exception()
        finally:
            for task in self._tasks:  # also when run() itself is cancelled
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if http is not None:
                await http.cleanup()  # no request may reach a stopped producer
            self._producer = None
            self._executor.shutdown(wait=True)
            self._snapshot_executor.shutdown(wait=True)
            await requests.stop()
            await snapshots.stop()
            await producer.stop()

    async def decide(self, request: RouteRequest) -> RouteDecision:
        """Route one request now and produce its decision exactly like a Kafka-routed one.

        Raises DecodeError for a request that cannot be routed: the caller gets the error,
        nothing is dead-lettered. Kafka errors propagate (the broker is unreachable).
        """
        producer, _ = self._running()
        started = time.monotonic()
        self.router.check(request)
        self._admit()
        [decision] = await self._on_routing_thread(self.router.route, [request])
        await self._produce(producer, self.settings.topic("decisions"), encode_decision(decision),
                            decision.request_id.encode())
        self.metrics.decision_latency.labels(source="http").observe(time.monotonic() - started)
        return decision

    async def publish(self, short: str, event: Event) -> None:
        """Produce ``event`` to the ``short`` topic (e.g. ``rewards``), keyed by its request id."""
        producer, _ = self._running()
        self._admit()
        await self._produce(producer, self.settings.topic(short), encode(event),
                            event.request_id.encode())  # type: ignore[attr-defined]

    def _admit(self) -> None:
        """Fail an HTTP call at once (503) while the broker is known down or too many wait."""
        if self._broker_down_since is not None:
            self.router.stats.unavailable += 1
            raise BrokerUnavailable(f"the broker has not acknowledged for "
                                    f"{time.monotonic() - self._broker_down_since:.0f} s")
        if self._waiting >= MAX_HTTP_WAITING:
            self.router.stats.unavailable += 1
            raise BrokerUnavailable(f"{self._waiting} calls already wait for the broker")

    async def _produce(self, producer: AIOKafkaProducer, topic: str, value: bytes, key: bytes) -> None:
        """Produce and wait for the acknowledgement, at most PRODUCE_TIMEOUT_S (BrokerUnavailable).

        A 503 means "maybe produced": the record may still reach the broker when it is back
        (a retried reward is de-duplicated by its reward id; a retried route is a new request).
        """
        self._waiting += 1
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), PRODUCE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._broker_down_since = self._broker_down_since or time.monotonic()
            self.router.stats.unavailable += 1
            raise BrokerUnavailable(f"no acknowledgement from the broker within {PRODUCE_TIMEOUT_S:g} s") from None
        finally:
            self._waiting -= 1

    def stalled(self) -> str | None:
        """Why the worker is not consuming, or None when both loops run and polled recently."""
        if not self._tasks:
            return "not started"
        if self.reset is not None:
            return str(self.reset)
        for task, name in zip(self._tasks, ("snapshots", "requests", "broker watch")):
            if task.done():
                return f"the {name} loop has stopped"
        if self._last_poll is None:
            return "the requests loop has not polled yet"
        silent = time.monotonic() - self._last_poll
        if silent > STALL_AFTER_S:
            return f"the requests loop has not polled for {silent:.0f} s"
        return None

    async def broker_problem(self) -> str | None:
        """Why the broker is unreachable, or None when it answered a metadata request in time."""
        if self._producer is None:
            return "not started"
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), BROKER_PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return f"no metadata from {self.settings.bootstrap_servers} within {BROKER_PROBE_TIMEOUT_S:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable; say which
            return f"metadata request to {self.settings.bootstrap_servers} failed: {exc!r}"
        return None

    @property
    def assigned_partitions(self) -> list[int]:
        """The requests partitions this worker's group member consumes."""
        return sorted(tp.partition for tp in self._assigned)

    def _running(self) -> tuple[AIOKafkaProducer, ThreadPoolExecutor]:
        if self._producer is None or self._executor is None:
            raise RuntimeError("the routing worker is not running")
        return self._producer, self._executor

    async def _follow_snapshots(self, consumer, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                if records:
                    self._guard.read(tp, records[-1].offset)
            self._guard.check(consumer)  # raises BrokerResetError
            for tp, records in batches.items():
                if tp.topic == self.settings.topic("models"):
                    await loop.run_in_executor(self._snapshot_executor, self.router.apply_specs,
                                               self._specs(records))
                    continue
                # Only the newest frame of a batch matters; older ones would be stale anyway.
                for i, record in enumerate(reversed(records)):
                    # Off the event loop: decoding, the sha256 and inverting K matrices take
                    # milliseconds to tens of them, which every request in flight would wait.
                    if await loop.run_in_executor(self._snapshot_executor, self.router.apply_snapshot,
                                                  record.value):
                        log.info("applied snapshot version %d", self.router.snapshot_version)
                        self.router.stats.snapshots_skipped += len(records) - i - 1
                        break

    def _specs(self, records) -> list[ModelSpec]:
        """The models-topic records that are ModelSpecs; the others are logged and counted.

        Not dead-lettered here: every router reads every record, so the learner (one per
        model) writes the registry's dead letters.
        """
        specs = []
        for record in records:
            try:
                specs.append(decode(ModelSpec, record.value))
            except DecodeError as exc:
                self.router.stats.specs_refused += 1
                self.metrics.specs_refused.inc()
                log.warning("models record at offset %d refused: %s", record.offset, exc)
        return specs

    async def _route_requests(self, consumer, producer, stop: asyncio.Event) -> None:
        """Route batches of requests; commit each batch's offsets once all it produced is acknowledged.

        Pipelined: while batch n's records travel to the broker, batch n+1 is fetched, decoded
        and routed (featurising included, on the routing thread). Batch n's offsets are
        committed right after, once every record it produced (decisions and dead letters) is
        acknowledged, and batches settle in order: at-least-once, exactly as without the
        pipeline, with at most one batch decided but not yet committed.
        """
        previous: _InFlight | None = None
        try:
            while not stop.is_set():
                # With a batch in flight, take only what is fetched already; none: settle it.
                batches = await consumer.getmany(timeout_ms=0 if previous else 200, max_records=self.max_batch)
                self._last_poll = time.monotonic()
                if previous is not None and not batches:
                    in_flight, previous = previous, None
                    await self._settle(consumer, in_flight)
                    continue
                current = await self._route_batch(batches, consumer, producer)
                if previous is not None:
                    await self._settle(consumer, previous)
                previous = current
                if previous is None:  # idle: what was acknowledged is committed now
                    await self._commit(consumer, force=True)
        except asyncio.CancelledError:
            # Stopping: commit what was acknowledged, if it is quick.
            with contextlib.suppress(Exception):
                if previous is not None:
                    await asyncio.wait_for(self._settle(consumer, previous), 5.0)
                await asyncio.wait_for(self._commit(consumer, force=True), 5.0)
            raise

    async def _route_batch(self, batches, consumer, producer) -> _InFlight | None:
        """Decode, route and produce one fetched batch (None if empty): its futures and offsets."""
        s = self.settings
        fetched = self._last_poll
        self._assigned = consumer.assignment()
        for tp, records in batches.items():
            if records:
                self._guard.read(tp, records[-1].offset)
        self._guard.check(consumer)  # raises BrokerResetError
        if not batches:
            return None
        good: list[RouteRequest] = []
        by_id = {}
        pending = []
        for records in batches.values():
            for record in records:
                try:
                    request = decode(RouteRequest, record.value)
                    self.router.check(request)
                    good.append(request)
                    by_id[request.request_id] = record
                except DecodeError as exc:
                    self.router.stats.rejected += 1
                    self.metrics.deadletters.labels(reason=exc.reason, worker="router").inc()
                    pending.append(await producer.send(s.topic("deadletter"), encode(
                        DeadLetter.for_record(record, exc.reason, exc.detail, self.worker_id))))
        decisions = []
        if good:
            try:
                decisions = await self._on_routing_thread(self.router.route, good)
            except Exception:  # noqa: BLE001 - a bug one request triggers must not stop routing
                log.exception("routing a batch of %d failed; routing its requests one by one", len(good))
                decisions, failed = await self._on_routing_thread(self._route_each, good)
                for request, exc in failed:
                    self.router.stats.rejected += 1
                    self.metrics.deadletters.labels(reason="internal_error", worker="router").inc()
                    record = by_id[request.request_id]
                    pending.append(await producer.send(s.topic("deadletter"), encode(
                        DeadLetter.for_record(record, "internal_error", repr(exc), self.worker_id))))
            topic = s.topic("decisions")
            for decision in decisions:
                pending.append(await producer.send(topic, encode_decision(decision),
                                                   key=decision.request_id.encode()))
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        return _InFlight(pending, offsets, fetched, len(decisions))

    async def _settle(self, consumer, batch: _InFlight) -> None:
        """Wait for a batch's acknowledgements, then commit its offsets (at-least-once)."""
        if batch.pending:
            await asyncio.gather(*batch.pending)
            self._broker_down_since = None  # it acknowledged
        latency = self.metrics.decision_latency.labels(source="kafka")
        acknowledged = time.monotonic()
        for _ in range(batch.decisions):
            latency.observe(acknowledged - batch.fetched)
        self._acknowledged.update(batch.offsets)  # batches settle in order: offsets only grow
        await self._commit(consumer)

    async def _commit(self, consumer, force: bool = False) -> None:
        """Commit the acknowledged offsets, at most every COMMIT_INTERVAL_S unless ``force``."""
        if not self._acknowledged or (not force and time.monotonic() - self._last_commit < COMMIT_INTERVAL_S):
            return
        assigned = consumer.assignment()
        # A partition revoked meanwhile is its new owner's to commit: it decides these again.
        offsets = {tp: offset for tp, offset in self._acknowledged.items() if tp in assigned}
        self._acknowledged = {}
        self._last_commit = time.monotonic()
        if not offsets:
            return
        try:
            await consumer.commit(offsets)  # at-least-once: after every decision is acknowledged
        except KafkaError as exc:
            # E.g. the group rebalanced while the broker was frozen: the new owner of
            # the partition decides these requests again (the join refuses the second
            # decision as duplicate_decision). Not a reason to stop routing.
            self.router.stats.commit_failures += 1
            log.warning("request offsets not committed (%r); they will be decided again", exc)

    async def _on_routing_thread(self, function, requests: list[RouteRequest]):
        """``function(requests)`` where routing happens: on the routing thread, or right here.

        A featuriser that says it is ``cheap`` (hashing: tens of microseconds a prompt) is run
        on the event loop itself: handing each batch to a thread and back cost more than the
        routing (at 200 requests/s a batch is one or two requests), and every hand-off is a
        thread switch that a busy machine may delay. Kafka and HTTP routing then share the
        event loop's thread, as they share the routing thread otherwise.
        """
        if self._inline:
            return function(requests)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, requests)

    def _route_each(self, requests: list[RouteRequest]) -> tuple[list[RouteDecision], list]:
        """Route requests one at a time: the decisions, and the (request, error) that failed."""
        decisions, failed = [], []
        for request in requests:
            try:
                decisions.extend(self.router.route([request]))
            except Exception as exc:  # noqa: BLE001 - dead-lettered by the caller
                failed.append((request, exc))
        return decisions, failed

    async def _watch_broker(self, producer: AIOKafkaProducer) -> None:
        """Clear the fail-fast state once the broker answers; stop if it came back empty."""
        last_layout = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            if self._broker_down_since is not None and await self.broker_problem() is None:
                log.info("the broker answers again after %.1f s", time.monotonic() - self._broker_down_since)
                self._broker_down_since = None
            if time.monotonic() - last_layout >= LAYOUT_CHECK_S:
                last_layout = time.monotonic()
                await check_layout(producer.client, self.settings, ROUTER_TOPICS, self.worker_id)


def run_routing_worker(settings: Settings) -> None:
    """Run a routing worker in the foreground until SIGINT/SIGTERM."""
    from deploy.process import run_until_signalled

    run_until_signalled(RoutingWorker(settings, freeze_gc=True).run, settings.log_level)
