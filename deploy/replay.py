"""The replay: a recorded routing dataset streamed through the live loop, then a held-out report.

While the real routing worker, feedback worker and learner run, the replay plays everyone
else: the application (it produces the train split's requests), the downstream caller (it
answers each decision with the recorded cost of the chosen model) and the evaluator (it
answers with the recorded quality after a random delay; some rewards twice, some never).
Afterwards it scores the newest snapshot greedily on the test split with the recorded full
information, against every single model, the cheapest, random and the oracle::

    report = asyncio.run(Replay(settings, load_dataset(path), ReplayOptions()).run())
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from aiokafka import TopicPartition
from tqdm import tqdm

from deploy.kafka import make_consumer, make_producer
from deploy.topics import expected_partitions
from router.datasets import RoutingDataset
from router.evaluation import baselines, score_choices
from router.featurise import featuriser_from_url
from router.snapshot import SnapshotError, decode_snapshot, verification_keys
from schemas import (
    DeadLetter,
    ModelResponse,
    Outcome,
    Preference,
    RewardEvent,
    RouteDecision,
    RouteRequest,
    decode,
    encode,
)
from schemas.reward import reward
from schemas.settings import Settings

log = logging.getLogger(__name__)

#: A dead letter carries the raw event it refuses, which may be over the 1 MiB event limit.
DEADLETTER_MAX_BYTES = 96 * 1024 * 1024


@dataclass(frozen=True)
class ReplayOptions:
    preference: Preference = Preference(quality=0.8, cost=0.2)
    seed: int = 0
    #: Evaluator delay: exponential with this mean, in seconds.
    reward_delay_mean_s: float = 2.0
    duplicate_share: float = 0.02
    loss_share: float = 0.01
    #: Requests in flight (sent, not yet decided): paces the stream like live traffic.
    max_in_flight: int = 64
    #: How long to wait for the last outcomes and snapshot after the stream, beyond the wait window.
    settle_s: float = 60.0
    progress: bool = True
    #: The routing worker's HTTP API (LocalLoop.router_url): the report then gives the router's
    #: own count of applied snapshots; without it, the distinct versions its decisions carry.
    router_url: str | None = None


@dataclass
class _Flow:
    """What the replay has seen so far, for its own run id only."""

    sent_at: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, RouteDecision] = field(default_factory=dict)
    decided_order: list[str] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    responses: int = 0
    rewards: int = 0
    lost: int = 0
    duplicated: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    last_outcome_offset: int = -1
    deadletter: Counter = field(default_factory=Counter)


class Replay:
    def __init__(self, settings: Settings, dataset: RoutingDataset, options: ReplayOptions = ReplayOptions(),
                 watchdog: Callable[[], None] | None = None):
        """``watchdog`` is called while waiting; it raises if a worker died (LocalLoop.check_alive)."""
        self.settings = settings
        self.watchdog = watchdog or (lambda: None)
        self.dataset = dataset
        self.options = options
        self.train = dataset.train()
        self.test = dataset.test()
        if not len(self.train) or not len(self.test):
            raise ValueError(f"dataset {dataset.name} needs both a train and a test split")
        self.run_id = uuid.uuid4().hex[:8]
        self.rng = np.random.default_rng(options.seed)
        self.flow = _Flow()
        self._rows = {self._request_id(i): i for i in range(len(self.train))}
        self._tasks: set[asyncio.Task] = set()

    def _request_id(self, row: int) -> str:
        return f"{self.run_id}-{row}"

    async def run(self) -> dict:
        s = self.settings
        started = time.monotonic()
        producer = make_producer(s)
        await producer.start()
        consumers = {}
        try:
            for short in ("decisions", "outcomes", "deadletter"):
                consumers[short] = await self._tail(short)
            in_flight = asyncio.Semaphore(self.options.max_in_flight)
            bar = tqdm(total=len(self.train), desc="replay", unit="req", disable=not self.options.progress)
            sending = asyncio.create_task(self._send_requests(producer, in_flight))
            while len(self.flow.decisions) < len(self.train):
                self.watchdog()
                await self._read_decisions(consumers["decisions"], producer, in_flight, bar)
                await self._read_outcomes(consumers["outcomes"])
                if sending.done() and sending.exception():
                    raise sending.exception()
            bar.close()
            stream_s = time.monotonic() - started
            await asyncio.gather(*self._tasks)  # every scheduled reward is sent
            deadline = time.monotonic() + s.reward_wait_s + self.options.settle_s
            while len(self.flow.outcomes) < len(self.flow.decisions) and time.monotonic() < deadline:
                await self._read_outcomes(consumers["outcomes"])
            snapshot = await self._final_snapshot(deadline)
            router_model = await self._router_model()
            await self._read_deadletter(consumers["deadletter"])
        finally:
            for consumer in consumers.values():
                await consumer.stop()
            await producer.stop()
        return self._report(snapshot, router_model, stream_s, time.monotonic() - started)

    async def _router_model(self) -> dict | None:
        """The router's GET /v1/model (None without a router_url)."""
        if self.options.router_url is None:
            return None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{self.options.router_url}/v1/model") as response:
                response.raise_for_status()
                return await response.json()

    async def _tail(self, short: str):
        """A consumer of every partition of a topic, from its end: our run's records are newer."""
        consumer = make_consumer(self.settings, group_id=None, enable_auto_commit=False)
        await consumer.start()
        topic = self.settings.topic(short)
        parts = [TopicPartition(topic, p) for p in range(expected_partitions(self.settings)[topic])]
        consumer.assign(parts)
        # The embedded broker's end offsets may point into the last batch: the run id filters
        # out the few older records this can re-read.
        await consumer.seek_to_end(*parts)
        return consumer

    async def _send_requests(self, producer, in_flight: asyncio.Semaphore) -> None:
        train, preference = self.train, self.options.preference
        available = train.available
        for row in self.rng.permutation(len(train)):
            await in_flight.acquire()
            request_id = self._request_id(int(row))
            candidates = [m for m, ok in zip(train.models, available[row]) if ok]
            request = RouteRequest(request_id=request_id, prompt=train.prompts[row], preference=preference,
                                   candidates=None if len(candidates) == len(train.models) else candidates)
            self.flow.sent_at[request_id] = time.monotonic()
            await producer.send(self.settings.topic("requests"), encode(request), key=request_id.encode())
        await producer.flush()

    async def _read_decisions(self, consumer, producer, in_flight, bar) -> None:
        batches = await consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                request_id = (record.key or b"").decode(errors="replace")
                if request_id not in self._rows or request_id in self.flow.decisions:
                    continue
                decision = decode(RouteDecision, record.value)
                self.flow.decisions[request_id] = decision
                self.flow.decided_order.append(request_id)
                self.flow.latency_ms.append((time.monotonic() - self.flow.sent_at[request_id]) * 1e3)
                in_flight.release()
                bar.update(1)
                await self._answer(producer, decision)

    async def _answer(self, producer, decision: RouteDecision) -> None:
        """Play the downstream caller now and the evaluator after a delay."""
        row = self._rows[decision.request_id]
        k = self.train.models.index(decision.model)
        cost, quality = float(self.train.cost[row, k]), float(self.train.quality[row, k])
        if not (np.isfinite(cost) and np.isfinite(quality)):
            raise RuntimeError(f"the router chose {decision.model} for {decision.request_id}, "
                               "which was not among its candidates")
        key = decision.request_id.encode()
        await producer.send(self.settings.topic("responses"), encode(ModelResponse(
            request_id=decision.request_id, model=decision.model, cost_usd=cost)), key=key)
        self.flow.responses += 1
        draw = self.rng.random()
        if draw < self.options.loss_share:
            self.flow.lost += 1
            return
        copies = 2 if draw < self.options.loss_share + self.options.duplicate_share else 1
        self.flow.duplicated += copies - 1
        event = RewardEvent(reward_id=f"{decision.request_id}/q", request_id=decision.request_id,
                            quality=quality, evaluator="replay")
        delay = float(self.rng.exponential(self.options.reward_delay_mean_s))
        task = asyncio.create_task(self._send_later(producer, delay, encode(event), key, copies))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_later(self, producer, delay: float, value: bytes, key: bytes, copies: int) -> None:
        await asyncio.sleep(delay)
        for _ in range(copies):
            await producer.send(self.settings.topic("rewards"), value, key=key)
            self.flow.rewards += 1

    async def _read_outcomes(self, consumer) -> None:
        batches = await consumer.getmany(timeout_ms=100)
        for records in batches.values():
            for record in records:
                request_id = (record.key or b"").decode(errors="replace")
                if request_id in self._rows:
                    self.flow.outcomes.setdefault(request_id, decode(Outcome, record.value))
                    self.flow.last_outcome_offset = max(self.flow.last_outcome_offset, record.offset)

    async def _read_deadletter(self, consumer) -> None:
        # Dead letters carry the raw event, not a key: read until a fetch comes back empty.
        while batches := await consumer.getmany(timeout_ms=1500):
            for records in batches.values():
                for record in records:
                    letter = decode(DeadLetter, record.value, max_bytes=DEADLETTER_MAX_BYTES)
                    if self.run_id.encode() in base64.b64decode(letter.raw_b64):
                        self.flow.deadletter[letter.reason] += 1

    async def _final_snapshot(self, deadline: float):
        """The newest snapshot, once it includes the last outcome of this run (or at the deadline)."""
        consumer = make_consumer(self.settings, group_id=None, enable_auto_commit=False)
        await consumer.start()
        part = TopicPartition(self.settings.topic("snapshots"), 0)
        consumer.assign([part])
        await consumer.seek_to_beginning(part)
        newest = None
        self.snapshots_published = 0
        try:
            while time.monotonic() < deadline:
                batch = await consumer.getmany(part, timeout_ms=500)
                for record in batch.get(part, []):
                    try:
                        snapshot = decode_snapshot(record.value, key=verification_keys(self.settings))
                    except SnapshotError:
                        continue
                    self.snapshots_published += 1
                    if newest is None or snapshot.header.version > newest.header.version:
                        newest = snapshot
                if not batch and newest is not None and newest.header.outcomes_offset >= self.flow.last_outcome_offset:
                    break
        finally:
            await consumer.stop()
        return newest

    def _report(self, snapshot, router_model: dict | None, stream_s: float, wall_s: float) -> dict:
        s, train, test, flow = self.settings, self.train, self.test, self.flow
        w = self.options.preference.quality
        rows = np.array([self._rows[r] for r in flow.decided_order])
        chosen = np.array([train.models.index(flow.decisions[r].model) for r in flow.decided_order])
        q, c = train.quality[rows, chosen], train.cost[rows, chosen]
        online_reward = reward(q, c, w, s.tau)
        half = len(online_reward) // 2
        random_online = baselines(train, w, s.tau)["random"].reward

        heldout = {"baselines": {name: score.to_dict() for name, score in
                                 baselines(test, w, s.tau, reference=train).items()}}
        if snapshot is not None:
            policy = snapshot.policy()
            X = featuriser_from_url(s.featuriser).encode(test.prompts)
            columns = np.array([test.models.index(arm) for arm in policy.arms])
            picks = policy.greedy(X, w, test.available[:, columns])
            heldout["policy"] = score_choices(test, columns[picks], w, s.tau).to_dict()
        versions = {d.snapshot_version for d in flow.decisions.values() if d.snapshot_version > 0}
        completions = Counter(o.completion for o in flow.outcomes.values())
        latency = np.array(flow.latency_ms) if flow.latency_ms else np.zeros(1)
        return {
            "dataset": self.dataset.name,
            "synthetic": self.dataset.synthetic,
            "featuriser": s.featuriser,
            "preference": {"quality": w, "cost": 1.0 - w},
            "tau": s.tau,
            "reward_wait_s": s.reward_wait_s,
            "wall_s": round(wall_s, 2),
            "throughput_rps": round(len(flow.decisions) / stream_s, 2),
            # Closed loop with max_in_flight requests outstanding: mostly queueing (about
            # max_in_flight / throughput), not routing; `routeloop bench loop` measures latency.
            "request_to_decision_ms": {"p50": float(np.percentile(latency, 50)),
                                       "p99": float(np.percentile(latency, 99)),
                                       "in_flight": self.options.max_in_flight},
            "counts": {
                "requests": len(flow.sent_at),
                "decisions": len(flow.decisions),
                "responses": flow.responses,
                "rewards": flow.rewards,
                "rewards_lost_simulated": flow.lost,
                "rewards_duplicated_simulated": flow.duplicated,
                "outcomes": len(flow.outcomes),
                "joined": completions.get("joined", 0),
                "defaulted": completions.get("defaulted", 0),
                "duplicates": flow.deadletter.get("duplicate_reward", 0),
                "late": flow.deadletter.get("late_reward", 0),
                "deadletter": sum(flow.deadletter.values()),
                "deadletter_by_reason": dict(flow.deadletter),
            },
            "snapshots": {
                "published": self.snapshots_published,
                "applied_by_router": router_model["snapshots"]["applied"] if router_model else len(versions),
                "refused_by_router": router_model["snapshots"]["refusals"] if router_model else None,
                "final_version": snapshot.header.version if snapshot else 0,
                "final_outcomes_offset": snapshot.header.outcomes_offset if snapshot else -1,
                "final_n_updates": snapshot.header.n_updates if snapshot else 0,
            },
            "online": {
                "mean_reward": float(online_reward.mean()),
                "mean_quality": float(q.mean()),
                "mean_cost_usd": float(c.mean()),
                "last_half_mean_reward": float(online_reward[half:].mean()),
                "random_policy_reward": random_online,
            },
            "heldout": heldout,
        }


def format_report(report: dict) -> str:
    """The report as a plain-text table for the terminal."""
    c, snap, online, held = report["counts"], report["snapshots"], report["online"], report["heldout"]
    pref = report["preference"]
    lines = [
        f"dataset {report['dataset']}{'  (SYNTHETIC)' if report['synthetic'] else ''}   "
        f"preference quality={pref['quality']:.2f} cost={pref['cost']:.2f}   tau ${report['tau']}   "
        f"featuriser {report['featuriser']}",
        f"wall {report['wall_s']:.1f} s   throughput {report['throughput_rps']:.1f} req/s   "
        f"request->decision p50 {report['request_to_decision_ms']['p50']:.0f} ms "
        f"p99 {report['request_to_decision_ms']['p99']:.0f} ms "
        f"({report['request_to_decision_ms']['in_flight']} requests in flight: queueing)",
        "counts   " + "  ".join(f"{k} {v}" for k, v in c.items() if k != "deadletter_by_reason"),
        f"snapshots published {snap['published']}  applied by router {snap['applied_by_router']}  "
        f"final version {snap['final_version']} (outcomes offset {snap['final_outcomes_offset']})",
        f"online   mean reward {online['mean_reward']:.4f}  second half {online['last_half_mean_reward']:.4f}  "
        f"(random {online['random_policy_reward']:.4f})  quality {online['mean_quality']:.4f}  "
        f"cost ${online['mean_cost_usd']:.6f}",
        "",
        f"{'held-out (test split)':<36}{'reward':>9}{'quality':>9}{'cost $':>11}",
    ]
    rows = ([("policy (learned, greedy)", held["policy"])] if "policy" in held else []) + sorted(
        held["baselines"].items(), key=lambda item: -item[1]["reward"])
    for name, score in rows:
        lines.append(f"{name:<36}{score['reward']:>9.4f}{score['quality']:>9.4f}{score['cost_usd']:>11.6f}")
    return "\n".join(lines)
