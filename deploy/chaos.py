"""Chaos: crashes, duplicates, garbage, forgery and broker trouble, audited afterwards.

A *scenario* replays a slice of a routing dataset through the real worker processes
(:class:`deploy.local.LocalLoop`) while it kills workers with SIGKILL and restarts them, or
freezes the broker, mid-replay. Afterwards it audits the topics alone (what every worker
wrote is the evidence)::

    result = await run_scenario("kill-9 feedback", settings, "../shared/data/routerbench-0shot",
                                log_dir, ChaosOptions(kills=(Kill(("feedback",), 100),)))
    result.lost, result.applied_twice, result.recovered_checksum_equal   # 0, 0, True

* every request has a decision; a routing worker killed after producing a decision and before
  committing its request offset decides that request again on restart (counted as
  ``duplicate_decisions``; the join refuses the second one as ``duplicate_decision``);
* no outcome lost: every request has an outcome on the outcomes topic, and the learner's
  final snapshot includes each distinct request once (``applied``; ``applied_twice`` counts
  updates beyond the distinct requests);
* the learner's state equals that of a run that never crashed: a fresh pure
  :class:`streams.learner.Learner` reads the outcomes topic in order, and at the outcomes
  offset of every snapshot the learner published its sha256 must be the snapshot's.

:func:`run_fuzz` (the cases come from :mod:`hypothesis`, a test dependency) produces bad input
to every input topic in one batch to running workers and accounts for every record: processed
or dead-lettered with a machine-readable reason (snapshots: applied, stale or refused).
:func:`run_chaos` runs everything for ``routeloop chaos`` and returns its report.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiokafka import TopicPartition

from deploy.kafka import make_consumer
from deploy.local import LocalLoop
from deploy.replay import Replay, ReplayOptions
from deploy.topics import expected_partitions
from router.datasets import RoutingDataset, load_dataset
from router.snapshot import SnapshotError, decode_snapshot, encode_snapshot, verification_keys
from schemas import DeadLetter, DecodeError, Outcome, RouteDecision, decode
from schemas.settings import Settings
from streams.learner import Learner

log = logging.getLogger(__name__)

#: A fetch that comes back empty after this long ends a topic read (end offsets are unreliable).
IDLE_MS = 1_500


# -- reading topics --------------------------------------------------------------------------------

async def read_topic(settings: Settings, short: str, idle_ms: int = IDLE_MS) -> list[Any]:
    """Every record of a topic, partition by partition in offset order, until a fetch is empty."""
    topic = settings.topic(short)
    parts = [TopicPartition(topic, p) for p in range(expected_partitions(settings)[topic])]
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    await consumer.start()
    by_part: dict[TopicPartition, list] = {tp: [] for tp in parts}
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        while batch := await consumer.getmany(timeout_ms=idle_ms, max_records=5_000):
            for tp, records in batch.items():
                by_part[tp].extend(records)
    finally:
        await consumer.stop()
    return [record for tp in parts for record in by_part[tp]]


# -- the learner's audit ---------------------------------------------------------------------------

@dataclass
class LearnerAudit:
    """The learner's snapshots against a fresh learner that read the outcomes topic in order."""

    outcome_records: int = 0
    #: Distinct request ids among the outcomes the final snapshot includes.
    distinct: int = 0
    snapshots: int = 0
    #: Snapshots whose sha256 differs from the reference at the same outcomes offset.
    mismatches: list[int] = field(default_factory=list)
    final_version: int = 0
    final_offset: int = -1
    #: The final snapshot's update count, and how far it is above / below the distinct requests.
    applied: int = 0
    applied_twice: int = 0
    not_applied: int = 0
    #: Outcome records the reference refused as duplicates (re-emitted by the feedback worker).
    duplicates_refused: int = 0
    undecodable: int = 0

    @property
    def checksums_equal(self) -> bool:
        return self.snapshots > 0 and not self.mismatches


async def audit_learner(settings: Settings, records: list | None = None) -> LearnerAudit:
    """Recompute the learner's state from the outcomes topic and compare every snapshot."""
    outcomes = await read_topic(settings, "outcomes") if records is None else records
    keys = verification_keys(settings)
    snapshots = []
    for record in await read_topic(settings, "snapshots"):
        try:
            snapshots.append(decode_snapshot(record.value, key=keys).header)
        except SnapshotError:
            continue  # forged or corrupt frames are the routers' business
    audit = LearnerAudit(outcome_records=len(outcomes), snapshots=len(snapshots))
    if not snapshots:
        return audit
    by_offset: dict[int, list] = {}
    for header in snapshots:
        by_offset.setdefault(header.outcomes_offset, []).append(header)
    final = max(snapshots, key=lambda h: h.version)
    audit.final_version, audit.final_offset, audit.applied = final.version, final.outcomes_offset, final.n_updates

    reference = Learner(settings)
    distinct: set[str] = set()

    def compare(offset: int) -> None:
        for header in by_offset.pop(offset, []):
            if reference.policy is None:
                audit.mismatches.append(header.version)
                continue
            sha = decode_snapshot(encode_snapshot(reference.policy, 1, offset)).header.sha256
            if sha != header.sha256 or header.n_updates != reference.policy.n_updates:
                audit.mismatches.append(header.version)

    compare(-1)
    for record in outcomes:
        try:
            outcome = decode(Outcome, record.value)
        except DecodeError:
            reference.offset = record.offset
            audit.undecodable += 1
        else:
            if not reference.apply(outcome, record.offset):
                audit.duplicates_refused += 1
            if record.offset <= final.outcomes_offset:
                distinct.add(outcome.request_id)
        compare(record.offset)
    for offset in sorted(by_offset):  # snapshots past the topic's end: they cannot be right
        audit.mismatches.extend(h.version for h in by_offset[offset])
    audit.distinct = len(distinct)
    audit.applied_twice = max(0, final.n_updates - audit.distinct)
    audit.not_applied = max(0, audit.distinct - final.n_updates)
    return audit


# -- scenarios -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kill:
    """SIGKILL these workers once the replay has ``after_decisions`` decisions; restart them."""

    workers: tuple[str, ...]
    after_decisions: int
    #: How long they stay dead.
    down_s: float = 1.0


@dataclass(frozen=True)
class Freeze:
    """SIGSTOP the broker for ``seconds`` once the replay has ``after_decisions`` decisions."""

    after_decisions: int
    seconds: float = 10.0
    #: Meanwhile, POST this many /v1/route requests at once: each must fail promptly with 503.
    http_probes: int = 8


@dataclass(frozen=True)
class ChaosOptions:
    #: Train prompts replayed (requests) and test prompts kept for the held-out report.
    requests: int = 400
    test_rows: int = 50
    #: Requests a second (the replay's application), and at most this many waiting for a decision.
    rate_per_s: float = 40.0
    max_in_flight: int = 8
    kills: tuple[Kill, ...] = ()
    freezes: tuple[Freeze, ...] = ()
    #: Hold the application's requests while a killed worker recovers (each kill then hits the
    #: loop under the same load); False keeps sending, so a backlog builds up.
    hold_traffic: bool = True
    #: Longer than any outage: a reward delayed by a crash must still join, not arrive late.
    reward_wait_s: float = 30.0
    reward_delay_mean_s: float = 0.3
    duplicate_share: float = 0.05
    #: Rewards never sent: their outcomes come with the default quality one window later.
    loss_share: float = 0.0
    snapshot_every_n: int = 50
    snapshot_every_s: float = 1.0
    featuriser: str = "hashing://?dim=384"
    seed: int = 0
    #: The whole replay must finish within this many seconds: nothing may hang forever.
    timeout_s: float = 300.0
    snapshot_key: str | None = None


@dataclass
class ScenarioResult:
    name: str
    events_in: int
    applied: int
    applied_twice: int
    lost: int
    deadlettered: int
    recovered_checksum_equal: bool
    decided: int = 0
    kills_done: int = 0
    freezes_done: int = 0
    wall_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        return {
            "name": self.name, "events_in": self.events_in, "applied": self.applied,
            "applied_twice": self.applied_twice, "lost": self.lost, "deadlettered": self.deadlettered,
            "recovered_checksum_equal": self.recovered_checksum_equal,
            "decided": self.decided, "kills": self.kills_done, "freezes": self.freezes_done,
            "wall_s": round(self.wall_s, 1), "details": self.details,
        }

    def summary(self) -> str:
        d = self.details
        return (f"{self.name}: in {self.events_in}  decided {self.decided}  applied {self.applied}  "
                f"applied twice {self.applied_twice}  lost {self.lost}  dead-lettered {self.deadlettered}  "
                f"checksums equal {self.recovered_checksum_equal}  kills {self.kills_done}  "
                f"freezes {self.freezes_done}  duplicate decisions {d.get('duplicate_decisions')}  "
                f"re-emitted outcomes {d.get('outcome_duplicates_on_topic')}  "
                f"late rewards {d.get('late_rewards')}  wall {self.wall_s:.0f} s")


class _Gate:
    """The replay's send pacing: ``rate_per_s`` at most, and closed while chaos says so."""

    def __init__(self, semaphore: asyncio.Semaphore, rate_per_s: float, open_: asyncio.Event) -> None:
        self.semaphore = semaphore
        self.interval = 1.0 / rate_per_s
        self.open = open_
        self._next = 0.0

    async def acquire(self) -> None:
        await self.semaphore.acquire()
        await self.open.wait()
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self.interval

    def release(self) -> None:
        self.semaphore.release()


class PacedReplay(Replay):
    """The replay, with its application paced and held while chaos holds it."""

    def __init__(self, *args: Any, rate_per_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rate_per_s = rate_per_s
        self.traffic = asyncio.Event()
        self.traffic.set()

    async def _send_requests(self, producer, in_flight: asyncio.Semaphore) -> None:
        await super()._send_requests(producer, _Gate(in_flight, self.rate_per_s, self.traffic))


def routerbench_slice(dataset: RoutingDataset, requests: int, test_rows: int, seed: int = 0) -> RoutingDataset:
    """``requests`` train rows and ``test_rows`` test rows, drawn at random (the same for a seed)."""
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(dataset.split == "train")
    test = np.flatnonzero(dataset.split == "test")
    chosen = [rng.choice(train, min(requests, len(train)), replace=False),
              rng.choice(test, min(test_rows, len(test)), replace=False)]
    return dataset.subset(np.concatenate(chosen))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class _Chaos:
    """Carries out the kills and freezes of one scenario while its replay runs."""

    def __init__(self, loop: LocalLoop, replay: PacedReplay, options: ChaosOptions, broker: Any) -> None:
        self.loop = loop
        self.replay = replay
        self.options = options
        self.broker = broker
        self.kills_done = 0
        self.freezes_done = 0
        self.http_probes: list[dict[str, Any]] = []
        self.recovery_s: list[float] = []

    async def run(self) -> None:
        actions = sorted([*self.options.kills, *self.options.freezes], key=lambda a: a.after_decisions)
        for action in actions:
            # Polled often: a routing worker killed right after its decision reached the topic
            # has likely not committed its request offset yet (it then decides it again).
            while len(self.replay.flow.decisions) < action.after_decisions:
                await asyncio.sleep(0.005)
            if isinstance(action, Kill):
                await self._kill(action)
            else:
                await self._freeze(action)

    async def _kill(self, kill: Kill) -> None:
        hold = self.options.hold_traffic
        if hold:
            self.replay.traffic.clear()
        outcomes_before = len(self.replay.flow.outcomes)
        for name in kill.workers:
            self.loop.kill(name, signal.SIGKILL)
        log.info("chaos: killed %s at %d decisions", ", ".join(kill.workers), len(self.replay.flow.decisions))
        await asyncio.sleep(kill.down_s)
        started = time.monotonic()
        for name in kill.workers:
            self.loop.restart(name)  # on this (the main) thread: the child dies with us
        self.kills_done += 1
        if hold:
            await self._recovered(kill.workers, outcomes_before, started)
            self.replay.traffic.set()
        self.recovery_s.append(round(time.monotonic() - started, 1))

    async def _recovered(self, workers: Iterable[str], outcomes_before: int, started: float,
                         timeout_s: float = 60.0) -> None:
        """Until the restarted workers work again (or the timeout: the audit will tell)."""
        deadline = started + timeout_s
        if "router" in workers and self.loop.router_url:
            while not await asyncio.to_thread(_healthy, self.loop.router_url) and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
        if "feedback" in workers:
            # The events in flight when it died are joined again once it is back.
            while len(self.replay.flow.outcomes) <= outcomes_before and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if "learner" in workers:
            await asyncio.sleep(2.0)  # it recovers from the newest snapshot in about 1.5 s

    async def _freeze(self, freeze: Freeze) -> None:
        if self.broker is None:
            raise RuntimeError("a freeze needs the EmbeddedBroker object")
        self.broker.freeze()
        log.info("chaos: broker frozen at %d decisions for %g s", len(self.replay.flow.decisions), freeze.seconds)
        started = time.monotonic()
        try:
            if freeze.http_probes and self.loop.router_url:
                await asyncio.sleep(0.5)
                self.http_probes = await probe_route(self.loop.router_url, freeze.http_probes)
            await asyncio.sleep(max(0.0, freeze.seconds - (time.monotonic() - started)))
        finally:
            self.broker.thaw()
        self.freezes_done += 1


async def probe_route(url: str, n: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """POST ``n`` /v1/route requests at once; each one's status, error code and seconds."""
    async def one(http: aiohttp.ClientSession, i: int) -> dict[str, Any]:
        started = time.monotonic()
        try:
            async with http.post(f"{url}/v1/route", json={"prompt": f"probe {i}"}) as response:
                body = await response.json(content_type=None)
                return {"status": response.status, "error": body.get("error"),
                        "seconds": round(time.monotonic() - started, 2)}
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return {"status": None, "error": type(exc).__name__, "seconds": round(time.monotonic() - started, 2)}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        return list(await asyncio.gather(*(one(http, i) for i in range(n))))


async def run_scenario(name: str, settings: Settings, dataset: RoutingDataset | str | Path,
                       log_dir: str | Path, options: ChaosOptions = ChaosOptions(),
                       broker: Any = None) -> ScenarioResult:
    """Replay a slice of ``dataset`` through worker processes on ``settings``' broker with chaos.

    ``settings`` names the broker and a topic prefix whose topics exist (or will be created);
    the workers' own settings are derived from it and ``options``. ``broker`` (an
    :class:`deploy.broker.EmbeddedBroker`) is needed for freezes.
    """
    data = load_dataset(dataset) if isinstance(dataset, (str, Path)) else dataset
    data = routerbench_slice(data, options.requests, options.test_rows, options.seed)
    live = settings.model_copy(update={
        "models": data.models, "featuriser": options.featuriser, "reward_wait_s": options.reward_wait_s,
        "snapshot_every_n": options.snapshot_every_n, "snapshot_every_s": options.snapshot_every_s,
        **({"snapshot_key": options.snapshot_key} if options.snapshot_key else {}),
    })
    started = time.monotonic()
    loop = LocalLoop(live, log_dir=log_dir, start_broker=False)
    try:
        # (LocalLoop.start runs its own event loop for the topics: off this one.)
        await asyncio.to_thread(loop.start)
        live = loop.settings
        await asyncio.to_thread(loop.wait_until_healthy, 60.0)
        replay = PacedReplay(live, data, ReplayOptions(
            seed=options.seed, reward_delay_mean_s=options.reward_delay_mean_s,
            duplicate_share=options.duplicate_share, loss_share=options.loss_share,
            max_in_flight=options.max_in_flight, settle_s=30.0, progress=False,
            router_url=loop.router_url), watchdog=loop.check_alive, rate_per_s=options.rate_per_s)
        chaos = _Chaos(loop, replay, options, broker)
        running = asyncio.create_task(replay.run())
        acting = asyncio.create_task(chaos.run())
        try:
            report = await asyncio.wait_for(asyncio.shield(running), options.timeout_s)
        except asyncio.TimeoutError:
            flow = replay.flow
            raise TimeoutError(
                f"{name}: the replay did not finish within {options.timeout_s:g} s: "
                f"{len(flow.sent_at)} sent, {len(flow.decisions)} decided, {len(flow.outcomes)} outcomes") from None
        finally:
            acting.cancel()
            await asyncio.gather(acting, return_exceptions=True)
            if not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
            if broker is not None and broker.frozen:
                broker.thaw()
        loop.check_alive()
        result = await _audit(name, live, replay, report, chaos)
    finally:
        await asyncio.to_thread(loop.stop)
    result.wall_s = time.monotonic() - started
    return result


async def _audit(name: str, live: Settings, replay: PacedReplay, report: dict, chaos: _Chaos) -> ScenarioResult:
    run_prefix = f"{replay.run_id}-".encode()
    mine = lambda key: key is not None and key.startswith(run_prefix)  # noqa: E731
    decision_records = [r for r in await read_topic(live, "decisions") if mine(r.key)]
    decisions = Counter(r.key for r in decision_records)
    outcome_records = await read_topic(live, "outcomes")
    learner = await audit_learner(live, outcome_records)
    ours = Counter(r.key for r in outcome_records if mine(r.key))
    letters = []
    for record in await read_topic(live, "deadletter"):
        letter = decode(DeadLetter, record.value)
        if replay.run_id.encode() in base64.b64decode(letter.raw_b64):
            letters.append(letter)
    reasons = Counter(letter.reason for letter in letters)
    # A second decision for a request comes from a routing worker that died before committing
    # its request offset; a refused *first* decision from a feedback worker that re-read its
    # uncommitted input after a restart (its table already held the decision).
    first: set[tuple[int, int]] = set()
    later: set[tuple[int, int]] = set()
    seen_keys: set[bytes] = set()
    for record in decision_records:
        (later if record.key in seen_keys else first).add((record.partition, record.offset))
        seen_keys.add(record.key)
    refused = {(l.partition, l.offset) for l in letters
               if l.reason == "duplicate_decision" and l.source_topic == live.topic("decisions")}
    sent = {rid.encode() for rid in replay.flow.sent_at}
    undecided = len(sent - set(decisions))
    no_outcome = len(sent - set(ours))
    lost = no_outcome + learner.not_applied
    return ScenarioResult(
        name=name,
        events_in=len(sent),
        applied=learner.applied,
        applied_twice=learner.applied_twice,
        lost=lost,
        deadlettered=len(letters),
        recovered_checksum_equal=learner.checksums_equal,
        decided=len(sent & set(decisions)),
        kills_done=chaos.kills_done,
        freezes_done=chaos.freezes_done,
        details={
            "undecided": undecided,
            "without_outcome": no_outcome,
            "not_applied": learner.not_applied,
            "duplicate_decisions": sum(decisions.values()) - len(decisions),
            "duplicate_decisions_refused": len(later & refused),
            "redelivered_to_feedback": {r: reasons.get(r, 0) for r in
                                        ("duplicate_decision", "duplicate_response", "duplicate_reward")},
            "first_decisions_refused_as_redelivered": len(first & refused),
            "outcome_duplicates_on_topic": sum(ours.values()) - len(ours),
            "learner_refused_duplicates": learner.duplicates_refused,
            "late_rewards": reasons.get("late_reward", 0),
            "deadletter_by_reason": dict(reasons),
            "rewards_sent": report["counts"]["rewards"],
            "rewards_duplicated": report["counts"]["rewards_duplicated_simulated"],
            "joined": report["counts"]["joined"],
            "defaulted": report["counts"]["defaulted"],
            "snapshots": learner.snapshots,
            "snapshot_mismatches": learner.mismatches,
            "final_snapshot": {"version": learner.final_version, "outcomes_offset": learner.final_offset,
                               "n_updates": learner.applied},
            "recovery_s": chaos.recovery_s,
            "http_probes_during_freeze": chaos.http_probes,
            "heldout_policy_reward": report["heldout"].get("policy", {}).get("reward"),
        },
    )
