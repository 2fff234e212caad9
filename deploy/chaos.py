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

from deploy.local import LocalLoop
from deploy.replay import Replay, ReplayOptions
from deploy.topics import IDLE_MS, iter_topic
from router.datasets import RoutingDataset, load_dataset
from router.snapshot import SnapshotError, decode_snapshot, encode_snapshot, verification_keys
from schemas import DeadLetter, DecodeError, Outcome, decode
from schemas.settings import Settings
from streams.learner import Learner

log = logging.getLogger(__name__)

#: A dead letter carries the raw bytes of what it refuses, which may be over the event limit.
DEADLETTER_MAX_BYTES = 96 * 1024 * 1024


async def read_topic(settings: Settings, short: str, idle_ms: int = IDLE_MS) -> list[Any]:
    """Every record of a topic, partition by partition in offset order (see iter_topic)."""
    records = [record async for record in iter_topic(settings, short, idle_ms)]
    return sorted(records, key=lambda record: record.partition)  # stable: offsets stay in order


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
            applied = reference.apply(outcome, record.offset)
        except DecodeError:  # dead-lettered by the learner too
            reference.offset = record.offset
            audit.undecodable += 1
        else:
            if not applied:
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
                # Two waves: the first waits for the acknowledgement timeout, the second (the
                # broker now known down) must be refused at once.
                for wave in (1, 2):
                    probes = await probe_route(self.loop.router_url, freeze.http_probes)
                    self.http_probes.extend({**probe, "wave": wave} for probe in probes)
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
        pids = {name: process.pid for name, process in loop.processes.items()}
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
        result.details["restarted"] = sorted(n for n, p in loop.processes.items() if p.pid != pids[n])
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
        letter = decode(DeadLetter, record.value, max_bytes=DEADLETTER_MAX_BYTES)
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


# -- fuzz: bad input on every input topic ---------------------------------------------------------

#: The fuzz loop's models and feature dimension (hashing featuriser).
FUZZ_MODELS = ("small", "large")
FUZZ_DIM = 16
#: The topics the workers read: requests (router), decisions/responses/rewards (feedback),
#: outcomes (learner), snapshots (router), models (router and learner; the learner
#: dead-letters what is not a ModelSpec).
INPUT_TOPICS = ("requests", "decisions", "responses", "rewards", "outcomes", "snapshots", "models")
#: A record the workers must use (a decision, a join, an update), not dead-letter.
PROCESSED = "processed"
_TOO_LARGE = 1_048_576 + 1_024


@dataclass(frozen=True)
class FuzzRecord:
    """One record to produce, and what must become of it."""

    topic: str
    key: bytes | None
    value: bytes | None
    #: Dead-letter reasons any one of which is right; {PROCESSED} if the record must be used.
    #: For snapshots: the router's refusal reasons, or "applied" / "stale".
    expect: frozenset[str]
    label: str
    #: 0: the first batch; 1: one reward window later (rewards for expired decisions).
    phase: int = 0


def _vector(rng: np.random.Generator, dim: int = FUZZ_DIM) -> list[float]:
    return [round(float(v), 6) for v in rng.standard_normal(dim)]


def _valid(topic: str, rid: str, rng: np.random.Generator, model: str = "small") -> dict[str, Any]:
    """A valid event of ``topic`` for request ``rid``, as a JSON-able dict."""
    pref = {"quality": 0.7, "cost": 0.3}
    if topic == "requests":
        return {"request_id": rid, "prompt": f"fuzz prompt {rid}", "preference": pref}
    if topic == "decisions":
        return {"request_id": rid, "model": model, "propensity": 0.5, "distribution": {m: 0.5 for m in FUZZ_MODELS},
                "preference": pref, "features": _vector(rng), "featuriser": f"hashing-{FUZZ_DIM}",
                "policy": "decomposed-ts", "snapshot_version": 0, "cold_start": True, "created_at": 1.0}
    if topic == "responses":
        return {"request_id": rid, "model": model, "cost_usd": 0.001, "created_at": 1.0}
    if topic == "rewards":
        return {"reward_id": f"w-{rid}", "request_id": rid, "quality": 0.5, "created_at": 1.0}
    if topic == "outcomes":
        return {"request_id": rid, "model": model, "features": _vector(rng), "preference": pref,
                "propensity": 0.5, "distribution": {m: 0.5 for m in FUZZ_MODELS}, "quality": 0.5,
                "cost_usd": 0.001, "reward": 0.3, "completion": "joined", "snapshot_version": 0,
                "decided_at": 1.0, "created_at": 1.0}
    if topic == "models":  # a price for a configured model: routing goes on
        return {"model": model, "price": 1.0, "created_at": 1.0}
    raise ValueError(topic)


#: Per topic: (required fields, numeric fields, string fields, [field, bad value] out of range).
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[tuple[str, Any], ...]]] = {
    "requests": (("request_id", "prompt"), ("created_at",), ("request_id", "prompt"),
                 (("preference", {"quality": -1.0, "cost": 1.0}), ("preference", {"quality": 0, "cost": 0}),
                  ("budget_usd", -1.0), ("candidates", []))),
    "decisions": (("request_id", "model", "propensity", "distribution", "preference", "features", "featuriser",
                   "policy", "snapshot_version", "cold_start"),
                  ("propensity", "created_at"), ("request_id", "model", "featuriser", "policy"),
                  (("propensity", 0.0), ("propensity", 1.5), ("snapshot_version", -1),
                   ("distribution", {"small": 2.0}), ("preference", {"quality": -1.0, "cost": 1.0}))),
    "responses": (("request_id", "model", "cost_usd"), ("cost_usd", "created_at"), ("request_id", "model"),
                  (("cost_usd", -0.01), ("prompt_tokens", -3), ("status", "maybe"))),
    "rewards": (("reward_id", "request_id", "quality"), ("quality", "created_at"), ("reward_id", "request_id"),
                (("quality", 1.5), ("quality", -0.1), ("quality", 1.0000001))),
    "outcomes": (("request_id", "model", "features", "preference", "propensity", "quality", "cost_usd",
                  "reward", "completion", "snapshot_version", "decided_at"),
                 ("quality", "cost_usd", "reward", "decided_at"), ("request_id", "model"),
                 (("quality", 1.5), ("cost_usd", -1.0), ("propensity", 0.0), ("completion", "guessed"))),
    # (price may be null: no price.)
    "models": (("model",), ("created_at",), ("model",),
               (("price", 0.0), ("price", -1.0), ("enabled", "yes"), ("model", ""))),
}

#: What a valid event alone becomes: requests are decided, outcomes learned from, and the
#: feedback worker closes a lone piece after the reward window.
_ALONE = {"requests": PROCESSED, "outcomes": PROCESSED, "models": PROCESSED, "decisions": "expired_no_response",
          "responses": "orphan_response", "rewards": "orphan_reward"}


def fuzz_cases(n: int, seed: int = 0, oversize_on_feedback: bool = True) -> list[FuzzRecord]:
    """``n`` records drawn by hypothesis across the input topics, plus the fixed cases.

    Drawn: bytes that are not JSON, JSON that is not an object, a missing field, a field of
    the wrong type, a string over its limit, NaN / infinities, values out of range (negative
    cost, quality above 1, ...), an unknown field, a key that is not the request id, and valid
    events. Fixed: a null value and a message over the size limit on every topic, an unknown
    model, a wrong dimension, a response for another model, duplicates, a reward for a
    decision that expired, full joins, and forged, corrupted and stale snapshots.

    ``oversize_on_feedback`` False leaves out the records over the size limit on the feedback
    worker's topics (a known gap of streams/app.py: its dead letter is over the Faust
    producer's 1 MB request limit, the agent crashes and the record is lost).
    """
    try:
        from hypothesis import HealthCheck, Phase, given, seed as hseed, settings as hsettings, strategies as st
    except ImportError:  # pragma: no cover - a test dependency
        raise RuntimeError("the fuzz cases need hypothesis: pip install 'routeloop[test]'") from None
    import orjson

    ints = st.integers(-(2**63), 2**63 - 1)  # what JSON carries here (orjson: 64 bits)
    wrong_for_number = st.one_of(st.text(max_size=8), st.booleans(), st.lists(ints, max_size=3),
                                 st.dictionaries(st.text(max_size=3), ints, max_size=2), st.none())
    wrong_for_string = st.one_of(ints, st.floats(allow_nan=False, allow_infinity=False),
                                 st.booleans(), st.lists(st.text(max_size=3), max_size=2), st.none())

    def mutation(topic: str):
        required, numbers, strings, ranged = _FIELDS[topic]
        kinds = [
            st.tuples(st.just("garbage"), st.binary(max_size=256)),
            st.tuples(st.just("not_object"), st.one_of(ints, st.floats(allow_nan=False, allow_infinity=False),
                                                       st.text(max_size=20), st.lists(ints, max_size=4),
                                                       st.booleans(), st.none())),
            st.tuples(st.just("missing"), st.sampled_from(required)),
            st.tuples(st.just("wrong_number"), st.sampled_from(numbers), wrong_for_number),
            st.tuples(st.just("wrong_string"), st.sampled_from(strings), wrong_for_string),
            st.tuples(st.just("huge"), st.sampled_from(strings), st.integers(1, 2_000)),
            st.tuples(st.just("non_finite"), st.sampled_from(numbers),
                      st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])),
            st.tuples(st.just("out_of_range"), st.sampled_from(ranged)),
            st.tuples(st.just("extra"), st.text(min_size=1, max_size=12)),
            st.tuples(st.just("valid"), st.sampled_from(FUZZ_MODELS)),
        ]
        if topic in ("decisions", "responses", "rewards"):
            kinds.append(st.tuples(st.just("key_mismatch"), st.binary(min_size=0, max_size=20)))
        return st.one_of(*kinds)

    drawn: list[tuple[str, tuple]] = []
    topics = st.sampled_from(("requests", "decisions", "responses", "rewards", "outcomes", "models"))

    @hsettings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
               suppress_health_check=list(HealthCheck))
    @hseed(seed)
    @given(st.data())
    def collect(data) -> None:
        topic = data.draw(topics)
        drawn.append((topic, data.draw(mutation(topic))))

    collect()
    rng = np.random.default_rng(seed)
    cases: list[FuzzRecord] = []
    for i, (topic, (kind, *args)) in enumerate(drawn):
        rid = f"fz{i}-{topic[:3]}"
        event = _valid(topic, rid, rng, model=args[0] if kind == "valid" else "small")
        key: bytes | None = rid.encode()
        expect = frozenset({"invalid_event"})
        value: bytes
        if kind == "garbage":
            value, expect = args[0], frozenset({"invalid_json", "invalid_event"})
        elif kind == "not_object":
            value = orjson.dumps(args[0])
        elif kind == "missing":
            event.pop(args[0])
            value = orjson.dumps(event)
        elif kind in ("wrong_number", "wrong_string"):
            event[args[0]] = args[1]
            value = orjson.dumps(event)
        elif kind == "huge":
            limit = 65_536 if args[0] == "prompt" else 128
            event[args[0]] = "x" * (limit + args[1])
            value = orjson.dumps(event)
        elif kind == "non_finite":
            event[args[0]] = 0.123456789
            value, expect = orjson.dumps(event).replace(b"0.123456789", args[1]), frozenset({"invalid_json"})
        elif kind == "out_of_range":
            event[args[0][0]] = args[0][1]
            value = orjson.dumps(event)
        elif kind == "extra":
            name = args[0] if args[0] not in event else args[0] + "_"
            event[name] = 1
            value = orjson.dumps(event)
        elif kind == "key_mismatch":
            value, key = orjson.dumps(event), (None if not args[0] else b"k:" + args[0])
            expect = frozenset({"key_mismatch"})
        else:  # valid
            value, expect = orjson.dumps(event), frozenset({_ALONE[topic]})
        cases.append(FuzzRecord(topic, key, value, expect, f"{topic}:{kind}"))
    return cases + _fixed_cases(rng, oversize_on_feedback)


def _fixed_cases(rng: np.random.Generator, oversize_on_feedback: bool = True) -> list[FuzzRecord]:
    import orjson

    dumps = orjson.dumps
    cases: list[FuzzRecord] = []
    add = lambda *a, **k: cases.append(FuzzRecord(*a, **k))  # noqa: E731
    for topic in ("requests", "decisions", "responses", "rewards", "outcomes", "models"):
        rid = f"fx-null-{topic[:3]}"
        add(topic, rid.encode(), None, frozenset({"empty"}), f"{topic}:null value")
        if topic in ("decisions", "responses", "rewards") and not oversize_on_feedback:
            continue
        big_id = f"fx-big-{topic[:3]}"
        big = _valid(topic, big_id, rng)
        if topic != "models":
            big["request_id"] = big_id
        raw = dumps(big)
        raw = raw[:-1] + b', "padding": "' + b"p" * (_TOO_LARGE - len(raw)) + b'"}'
        add(topic, big_id.encode(), raw, frozenset({"too_large"}), f"{topic}:over the size limit")
    # requests the router must refuse, and ones it must decide
    unknown = {**_valid("requests", "fx-unknown-model", rng), "candidates": ["no-such-model"]}
    add("requests", b"fx-unknown-model", dumps(unknown), frozenset({"unknown_model"}), "requests:unknown model")
    wrong_dim = {**_valid("requests", "fx-wrong-dim", rng), "embedding": _vector(rng, FUZZ_DIM + 1)}
    add("requests", b"fx-wrong-dim", dumps(wrong_dim), frozenset({"bad_dimension"}), "requests:wrong dimension")
    embedded = {**_valid("requests", "fx-embedding", rng), "embedding": _vector(rng)}
    del embedded["prompt"]
    add("requests", b"fx-embedding", dumps(embedded), frozenset({PROCESSED}), "requests:embedding")
    # the feedback worker: joins, duplicates, a mismatch, an expired decision's late reward
    for j in range(5):
        rid = f"fx-join-{j}"
        for topic in ("decisions", "responses", "rewards"):
            add(topic, rid.encode(), dumps(_valid(topic, rid, rng)), frozenset({PROCESSED}), f"{topic}:joined")
    add("rewards", b"fx-join-0", dumps(_valid("rewards", "fx-join-0", rng)), frozenset({"duplicate_reward"}),
        "rewards:duplicate")
    add("decisions", b"fx-join-1", dumps(_valid("decisions", "fx-join-1", rng)), frozenset({"duplicate_decision"}),
        "decisions:duplicate")
    add("responses", b"fx-join-2", dumps(_valid("responses", "fx-join-2", rng)), frozenset({"duplicate_response"}),
        "responses:duplicate")
    add("decisions", b"fx-mismatch", dumps(_valid("decisions", "fx-mismatch", rng, "small")),
        frozenset({"expired_no_response"}), "decisions:its response names another model")
    add("responses", b"fx-mismatch", dumps(_valid("responses", "fx-mismatch", rng, "large")),
        frozenset({"model_mismatch"}), "responses:another model than the decision's")
    for topic in ("decisions", "responses"):  # closed as defaulted, then its reward comes late
        add(topic, b"fx-expired", dumps(_valid(topic, "fx-expired", rng)), frozenset({PROCESSED}), f"{topic}:defaulted")
    add("rewards", b"fx-expired", dumps(_valid("rewards", "fx-expired", rng)), frozenset({"late_reward"}),
        "rewards:for a decision that expired", phase=1)
    # the learner: a duplicate is used (refused as a duplicate), an unknown model and a wrong
    # dimension are refused
    first = dumps(_valid("outcomes", "fx-twice", rng))
    add("outcomes", b"fx-twice", first, frozenset({PROCESSED}), "outcomes:first copy")
    add("outcomes", b"fx-twice", first, frozenset({PROCESSED}), "outcomes:second copy (a duplicate)")
    add("outcomes", b"fx-arm", dumps(_valid("outcomes", "fx-arm", rng, model="gpt-evil")),
        frozenset({"unknown_model"}), "outcomes:unknown model")
    odd = {**_valid("outcomes", "fx-odd-dim", rng), "features": _vector(rng, FUZZ_DIM * 2)}
    add("outcomes", b"fx-odd-dim", dumps(odd), frozenset({"bad_dimension"}), "outcomes:wrong dimension")
    return cases


def snapshot_cases(n: int, key: str, seed: int = 0) -> list[FuzzRecord]:
    """Snapshot frames for a router with ``key``: forged, corrupted, stale and one good one.

    ``n`` random corruptions of a signed frame are drawn with hypothesis (a flipped byte, a
    truncation, random bytes); the good frame comes last (so the earlier ones are looked at).
    """
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings as hsettings, strategies as st

    from router.policy import make_policy

    policy = make_policy("decomposed-ts", arms=list(FUZZ_MODELS), dim=FUZZ_DIM, tau=0.01)
    rng = np.random.default_rng(seed)
    for i in range(20):
        policy.learn(i % 2, rng.standard_normal(FUZZ_DIM), 0.5, 0.001)
    k = key.encode()
    signed = encode_snapshot(policy, version=1_000_000, outcomes_offset=0, key=k)
    frames: list[tuple[bytes, frozenset[str], str]] = [
        (encode_snapshot(policy, 1_000_000, 0), frozenset({"unsigned"}), "unsigned"),
        (encode_snapshot(policy, 1_000_000, 0, key=b"not the key"), frozenset({"bad_signature"}), "wrong key"),
        (signed.replace(b'"version":1000000', b'"version":1000009'), frozenset({"bad_signature"}),
         "version rewritten after signing"),
        (signed[:-1] + bytes([signed[-1] ^ 0xFF]), frozenset({"bad_checksum"}), "body corrupted"),
        (signed[: len(signed) // 2], frozenset({"bad_checksum", "bad_frame"}), "truncated"),
        (b"\x80\x04pickle", frozenset({"bad_frame"}), "a pickle"),
        (signed.replace(b'"decomposed-ts"', b'"pickle-please"'), frozenset({"bad_header", "unknown_policy",
                                                                         "bad_signature"}), "unknown policy"),
        (encode_snapshot(make_policy("decomposed-ts", arms=list(FUZZ_MODELS), dim=FUZZ_DIM + 1, tau=0.01),
                         1_000_000, 0, key=k), frozenset({"bad_dimension"}), "wrong dimension"),
    ]
    drawn: list[tuple[str, Any]] = []

    @hsettings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
               suppress_health_check=list(HealthCheck))
    @hseed(seed)
    @given(st.one_of(
        st.tuples(st.just("flip"), st.integers(0, len(signed) - 1), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, len(signed) - 1)),
        st.tuples(st.just("bytes"), st.binary(max_size=512)),
    ))
    def collect(mutation) -> None:
        drawn.append(mutation)

    collect()
    refusals = frozenset({"bad_frame", "bad_header", "bad_checksum", "bad_signature", "unsigned",
                          "unknown_policy", "bad_dimension", "too_large"})
    for kind, *args in drawn:
        if kind == "flip":
            frame = bytearray(signed)
            frame[args[0]] ^= args[1]
            frames.append((bytes(frame), refusals, f"byte {args[0]} flipped"))
        elif kind == "truncate":
            frames.append((signed[: args[0]], refusals, f"truncated at {args[0]}"))
        else:
            frames.append((args[0], refusals, "random bytes"))
    cases = [FuzzRecord("snapshots", b"model", frame, expect, f"snapshots:{label}") for frame, expect, label in frames]
    # Later, one at a time: of one fetch the router looks at the frames newest first and skips
    # those older than one it applied.
    return cases + [
        FuzzRecord("snapshots", b"model", signed, frozenset({"applied"}), "snapshots:good, signed", phase=1),
        FuzzRecord("snapshots", b"model", encode_snapshot(policy, 999_999, 0, key=k), frozenset({"stale"}),
                   "snapshots:older version", phase=2),
    ]


@dataclass
class FuzzResult:
    cases: int = 0
    crashes: int = 0
    deadlettered: int = 0
    processed: int = 0
    unaccounted: int = 0
    #: Records dead-lettered with a reason their case does not allow (or used though bad).
    wrong: list[dict[str, Any]] = field(default_factory=list)
    stalled: bool = False
    by_reason: dict[str, int] = field(default_factory=dict)
    snapshots: dict[str, int] = field(default_factory=dict)
    crashed: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def to_report(self) -> dict[str, Any]:
        return {"cases": self.cases, "crashes": self.crashes, "deadlettered": self.deadlettered,
                "unaccounted": self.unaccounted, "processed": self.processed, "wrong_reason": len(self.wrong),
                "stalled": self.stalled, "by_reason": self.by_reason, "snapshots": self.snapshots,
                "crashed": self.crashed, "wall_s": round(self.wall_s, 1), "wrong": self.wrong[:20]}

    def summary(self) -> str:
        return (f"fuzz: {self.cases} records  processed {self.processed}  dead-lettered {self.deadlettered}  "
                f"unaccounted {self.unaccounted}  wrong reason {len(self.wrong)}  crashes {self.crashes}  "
                f"stalled {self.stalled}  snapshots {self.snapshots}  wall {self.wall_s:.0f} s")


async def run_fuzz(settings: Settings, log_dir: str | Path, n: int = 400, n_snapshots: int = 40,
                   seed: int = 0, timeout_s: float = 60.0, oversize_on_feedback: bool = True,
                   reward_wait_s: float = 4.0) -> FuzzResult:
    """Produce the fuzz cases in one batch to a running router, feedback worker and learner.

    The router and the learner run in this process (RoutingWorker, LearnerWorker), the
    feedback worker as a child process. Afterwards every record is accounted for: used
    (decided, joined, learned from; snapshots applied or stale) or dead-lettered (snapshots:
    refused), with a reason its case allows; the workers must still be running and must
    still answer a last good request, join and outcome. A crash of the feedback worker's Faust
    agent (Faust restarts it; the event it held is gone) counts as a crash.
    """
    from deploy.kafka import make_producer
    from router.worker import RoutingWorker
    from streams.learner import LearnerWorker

    key = "fuzz-snapshot-key"
    live = settings.model_copy(update={
        "models": FUZZ_MODELS, "featuriser": f"hashing://?dim={FUZZ_DIM}", "reward_wait_s": reward_wait_s,
        "snapshot_key": key, "snapshot_every_n": 10_000, "snapshot_every_s": 1.0, "default_quality": 0.0,
        "http_port": 0, "log_level": "WARNING"})
    started = time.monotonic()
    cases = fuzz_cases(n, seed, oversize_on_feedback) + snapshot_cases(n_snapshots, key, seed)
    result = FuzzResult(cases=len(cases))
    # (Its own free ports: streams.app gives Faust http_port as web_port, and 0 is refused.)
    feedback = LocalLoop(live, log_dir=log_dir, start_broker=False, workers=("feedback",))
    await asyncio.to_thread(feedback.start)
    router, learner = RoutingWorker(live), LearnerWorker(live)
    stops = {"router": asyncio.Event(), "learner": asyncio.Event()}
    tasks = {"router": asyncio.create_task(router.run(stops["router"])),
             "learner": asyncio.create_task(learner.run(stops["learner"]))}
    where: list[tuple[int, int] | None] = []
    try:
        # Running workers: the router consuming, the learner past its recovery.
        if not await _until(lambda: router.stalled() is None and learner.learning, tasks, feedback, 60.0):
            raise RuntimeError("the fuzz workers did not start")
        async with make_producer(live) as producer:
            # One batch: every record handed to the producer at once, then one flush.
            futures = [await producer.send(live.topic(c.topic), c.value, key=c.key)
                       for c in cases if c.phase == 0]
            await producer.flush()
            metadata = iter([f.result() for f in futures])
            later: dict[int, Any] = {}
            for phase in sorted({c.phase for c in cases} - {0}):
                if phase == 1:  # once the decision it rewards has closed as defaulted
                    await _until(lambda: "fx-expired" in learner.learner.seen(), tasks, feedback, timeout_s)
                await asyncio.sleep(1.5)
                sent = [await producer.send(live.topic(c.topic), c.value, key=c.key) for c in cases if c.phase == phase]
                await producer.flush()
                later[phase] = iter([f.result() for f in sent])
            for c in cases:
                md = next(metadata) if c.phase == 0 else next(later[c.phase])
                where.append((md.partition, md.offset))
            # Still alive and still working: one more request, join and outcome.
            sentinel = "fz-sentinel"
            await producer.send(live.topic("requests"), orjson_dumps(_valid("requests", f"{sentinel}-req",
                                                                           np.random.default_rng(1))),
                                key=f"{sentinel}-req".encode())
            for topic in ("decisions", "responses", "rewards"):
                await producer.send(live.topic(topic), orjson_dumps(_valid(topic, sentinel, np.random.default_rng(2))),
                                    key=sentinel.encode())
            await producer.flush()
        requests_in = 1 + sum(1 for c in cases if c.topic == "requests")

        def sentinel_done() -> bool:
            stats = router.router.stats
            return stats.decisions + stats.rejected >= requests_in and sentinel in learner.learner.seen()

        result.stalled = not await _until(sentinel_done, tasks, feedback, timeout_s)
        await asyncio.sleep(live.reward_wait_s + 2.0)  # the last lone pieces close
    finally:
        for name, task in tasks.items():
            if task.done() and (task.cancelled() or task.exception()):
                result.crashed.append(f"{name}: {task.exception()!r}" if not task.cancelled() else name)
            stops[name].set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for name, process in feedback.processes.items():
            if process.poll() is not None:
                result.crashed.append(f"feedback exited with {process.returncode}")
        await asyncio.to_thread(feedback.stop)
        for line in (Path(log_dir) / "feedback.log").read_text(errors="replace").splitlines():
            if "Crashed reason=" in line:  # Faust restarts a crashed agent; its event is lost
                result.crashed.append("feedback agent " + line[line.index("Crashed reason="):][:300])
    result.crashes = len(result.crashed)
    await _account(live, cases, where, router, learner, result)
    result.wall_s = time.monotonic() - started
    return result


def orjson_dumps(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)


async def _until(condition, tasks: dict[str, asyncio.Task], loop: LocalLoop, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if any(t.done() for t in tasks.values()) or any(p.poll() is not None for p in loop.processes.values()):
            return False
        await asyncio.sleep(0.25)
    return False


async def _account(live: Settings, cases: list[FuzzRecord], where: list, router: Any, learner: Any,
                   result: FuzzResult) -> None:
    letters: dict[tuple[str, int | None, int | None], str] = {}
    for record in await read_topic(live, "deadletter"):
        letter = decode(DeadLetter, record.value, max_bytes=DEADLETTER_MAX_BYTES)
        letters.setdefault((letter.source_topic, letter.partition, letter.offset), letter.reason)
    decided = {r.key for r in await read_topic(live, "decisions")}
    outcomes = await read_topic(live, "outcomes")
    joined = {r.key for r in outcomes}
    reasons: Counter = Counter()
    for case, (partition, offset) in zip(cases, where):
        if case.topic == "snapshots":
            continue
        reason = letters.get((live.topic(case.topic), partition, offset))
        if reason is not None:
            reasons[reason] += 1
            result.deadlettered += 1
            ok = reason in case.expect
        else:
            # The learner reads every outcome and models record: not dead-lettered means used.
            used = {"requests": case.key in decided, "outcomes": True, "models": True}.get(
                case.topic, case.key in joined)
            if not used:
                result.unaccounted += 1
                result.wrong.append({"label": case.label, "expected": sorted(case.expect), "got": None})
                continue
            result.processed += 1
            ok = PROCESSED in case.expect
            reason = PROCESSED
        if not ok:
            result.wrong.append({"label": case.label, "expected": sorted(case.expect), "got": reason,
                                 "value": (case.value or b"")[:120].decode(errors="replace")})
    # The learner read every outcome record: used (applied or a duplicate) or dead-lettered.
    learned = (learner.learner.policy.n_updates if learner.learner.policy else 0) + learner.learner.duplicates
    refused = sum(1 for (topic, _, _) in letters if topic == live.topic("outcomes"))
    if learned + refused != len(outcomes):
        result.unaccounted += abs(len(outcomes) - learned - refused)
    stats = router.router.stats
    # Every router reads the models topic too: it must refuse exactly what the learner did.
    models_refused = sum(1 for (topic, _, _) in letters if topic == live.topic("models"))
    if stats.specs_refused != models_refused:
        result.wrong.append({"label": "models", "expected": f"{models_refused} refused by the router",
                             "got": stats.specs_refused})
    snapshot_cases_in = sum(1 for c in cases if c.topic == "snapshots")
    result.snapshots = {"in": snapshot_cases_in + learner.published, "applied": stats.snapshots_applied,
                        "stale": stats.snapshots_stale, "refused": stats.snapshots_refused,
                        "skipped": stats.snapshots_skipped}
    seen = stats.snapshots_applied + stats.snapshots_stale + stats.snapshots_refused + stats.snapshots_skipped
    result.unaccounted += abs(result.snapshots["in"] - seen)
    expected_refusals = Counter()
    for case in cases:
        if case.topic == "snapshots" and len(case.expect) == 1 and not case.expect & {"applied", "stale"}:
            expected_refusals[next(iter(case.expect))] += 1
    for reason, count in expected_refusals.items():
        if stats.refusals.get(reason, 0) < count:
            result.wrong.append({"label": "snapshots", "expected": f"{count} x {reason}",
                                 "got": stats.refusals.get(reason, 0)})
    result.by_reason = dict(reasons) | {f"snapshot:{k}": v for k, v in stats.refusals.items()}


# -- routeloop chaos ------------------------------------------------------------------------------

def default_scenarios(requests: int, seed: int = 0) -> list[tuple[str, ChaosOptions]]:
    """The scenarios of ``routeloop chaos``: each worker killed twice alone, all together, a freeze."""
    at = lambda *fractions: [int(requests * f) for f in fractions]  # noqa: E731
    base = ChaosOptions(requests=requests, test_rows=200, rate_per_s=40.0, reward_wait_s=20.0,
                        loss_share=0.01, duplicate_share=0.02, reward_delay_mean_s=0.5, seed=seed,
                        timeout_s=max(300.0, requests / 10.0 + 240.0))
    kill = lambda workers: tuple(Kill(workers, n) for n in at(0.25, 0.6))  # noqa: E731
    return [
        ("kill -9 the feedback worker (twice)", replace(base, kills=kill(("feedback",)))),
        ("kill -9 the learner (twice)", replace(base, kills=kill(("learner",)))),
        ("kill -9 the routing worker (twice)", replace(base, kills=kill(("router",)))),
        ("kill -9 all three together (twice)", replace(base, kills=kill(("router", "feedback", "learner")))),
        ("kill -9 each in turn, traffic not held (a backlog builds)", replace(base, hold_traffic=False, kills=(
            Kill(("router",), at(0.2)[0]), Kill(("feedback",), at(0.4)[0]), Kill(("learner",), at(0.6)[0])))),
        ("broker frozen for 10 s", replace(base, freezes=(Freeze(at(0.4)[0], 10.0, http_probes=16),))),
    ]


def goal_met(report: dict[str, Any]) -> bool:
    """Zero lost, zero applied twice, zero crashes, zero unaccounted, every checksum equal."""
    scenarios_ok = all(s["lost"] == 0 and s["applied_twice"] == 0 and s["recovered_checksum_equal"]
                       for s in report["scenarios"])
    fuzz = report.get("fuzz") or {}
    return scenarios_ok and fuzz.get("crashes", 1) == 0 and fuzz.get("unaccounted", 1) == 0


async def run_chaos(dataset: str | Path, log_dir: str | Path, requests: int = 600, fuzz_cases: int = 600,
                    seed: int = 0, only: Iterable[str] | None = None, echo=print) -> dict[str, Any]:
    """Every scenario and the fuzz on a broker of their own; the report of ``routeloop chaos``.

    Each scenario gets a fresh topic prefix (and fresh workers). ``only`` keeps the scenarios
    whose name contains one of its words (``fuzz`` for the fuzz).
    """
    import uuid

    from deploy.broker import EmbeddedBroker

    log_dir = Path(log_dir)
    data = load_dataset(dataset)
    words = [w.lower() for w in only] if only else None
    keep = lambda name: words is None or any(w in name.lower() for w in words)  # noqa: E731
    report: dict[str, Any] = {"dataset": str(dataset), "requests_per_scenario": requests, "seed": seed,
                              "scenarios": [], "fuzz": None}
    started = time.monotonic()
    with EmbeddedBroker(log_path=log_dir / "broker.log") as broker:
        for i, (name, options) in enumerate(default_scenarios(requests, seed)):
            if not keep(name):
                continue
            settings = Settings(bootstrap_servers=broker.bootstrap_servers,
                                topic_prefix=f"chaos{i}-{uuid.uuid4().hex[:6]}.", log_level="WARNING")
            echo(f"scenario: {name} ...")
            result = await run_scenario(name, settings, data, log_dir / f"scenario{i}", options, broker=broker)
            echo("  " + result.summary())
            report["scenarios"].append(result.to_report())
        if keep("fuzz"):
            settings = Settings(bootstrap_servers=broker.bootstrap_servers,
                                topic_prefix=f"chaosfuzz-{uuid.uuid4().hex[:6]}.", log_level="WARNING")
            from deploy.topics import ensure_topics

            await ensure_topics(settings)
            echo(f"fuzz: {fuzz_cases} hypothesis cases and the fixed ones, in one batch ...")
            fuzz = await run_fuzz(settings, log_dir / "fuzz", n=fuzz_cases, n_snapshots=max(10, fuzz_cases // 10),
                                  seed=seed)
            echo("  " + fuzz.summary())
            report["fuzz"] = fuzz.to_report()
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["goal_met"] = goal_met(report)
    return report


def format_chaos(report: dict[str, Any]) -> str:
    """The report as a table for the terminal."""
    head = f"{'scenario':<58}{'in':>6}{'applied':>9}{'twice':>7}{'lost':>6}{'dead':>6}{'dup dec':>9}{'checksums':>11}"
    lines = [head]
    for s in report["scenarios"]:
        lines.append(f"{s['name'][:57]:<58}{s['events_in']:>6}{s['applied']:>9}{s['applied_twice']:>7}"
                     f"{s['lost']:>6}{s['deadlettered']:>6}{s['details']['duplicate_decisions']:>9}"
                     f"{'equal' if s['recovered_checksum_equal'] else 'DIFFER':>11}")
    fuzz = report.get("fuzz")
    if fuzz:
        lines.append(f"fuzz: {fuzz['cases']} cases  crashes {fuzz['crashes']}  dead-lettered {fuzz['deadlettered']}  "
                     f"unaccounted {fuzz['unaccounted']}  wrong reason {fuzz['wrong_reason']}")
        for crash in fuzz["crashed"][:5]:
            lines.append(f"  crash: {crash}")
    lines.append(f"goal (0 lost, 0 applied twice, 0 crashes, 0 unaccounted, checksums equal): "
                 f"{'met' if report['goal_met'] else 'NOT met'}   wall {report['wall_s']:.0f} s")
    return "\n".join(lines)
