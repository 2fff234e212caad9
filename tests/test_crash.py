"""Crashes: kill -9 the workers mid-replay; nothing lost, nothing applied twice, the same model.

The pure part checks the learner's de-duplication window across a restart (hypothesis drives
where duplicates fall and where the learner crashes). The integration part replays RouterBench
through the real worker processes while ``deploy.chaos`` kills them with SIGKILL (the routing
worker, the feedback worker, the learner, each alone, then all together) and restarts them,
then audits the topics: every request decided, every outcome on the topic once per request
(a re-decided request is refused downstream as ``duplicate_decision``), every outcome applied
exactly once, and every snapshot's sha256 equal to that of a fresh learner that read the
outcomes topic in order and never crashed.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from deploy.chaos import ChaosOptions, Kill, audit_learner, run_scenario
from deploy.kafka import make_producer
from router.snapshot import decode_snapshot
from schemas import Outcome, Preference, encode
from schemas.settings import Settings
from streams.learner import Learner, LearnerWorker

MODELS = ("small", "large")
SETTINGS = Settings(models=MODELS, snapshot_every_n=10)


def outcome(i: int, request: int) -> Outcome:
    rng = np.random.default_rng(request)
    return Outcome(
        request_id=f"q{request}", model=MODELS[request % 2], features=rng.standard_normal(8).astype(np.float32),
        preference=Preference(quality=0.8, cost=0.2), propensity=0.5, distribution={m: 0.5 for m in MODELS},
        quality=float(rng.random()), cost_usd=0.001 * (1 + request % 2), reward=0.0, completion="joined",
        snapshot_version=0, decided_at=0.0, created_at=float(i))


def checksum(learner: Learner) -> str:
    return decode_snapshot(learner.snapshot_frame()).header.sha256


@hsettings(max_examples=60, deadline=None)
@given(
    requests=st.lists(st.integers(0, 25), min_size=2, max_size=80),
    crash=st.data(),
    window=st.integers(1, 30),
)
def test_a_restarted_learner_refuses_the_duplicates_an_uninterrupted_one_would(requests, crash, window):
    """Request ids repeat anywhere (re-emitted outcomes); the learner crashes at any offset."""
    log = [outcome(i, r) for i, r in enumerate(requests)]
    at = crash.draw(st.integers(0, len(log) - 2), label="snapshot offset")

    uninterrupted = Learner(SETTINGS, seen_window=window)
    applied = [uninterrupted.apply(o, i) for i, o in enumerate(log)]

    first = Learner(SETTINGS, seen_window=window)
    for i in range(at + 1):
        first.apply(log[i], i)
    frame = first.snapshot_frame()  # ... then kill -9
    restarted = Learner(SETTINGS, seen_window=window)
    restarted.restore(frame)
    for i in range(restarted.window_start(), at + 1):  # what LearnerWorker re-reads
        restarted.remember(log[i], i)
    assert restarted.seen() == first.seen()
    again = [restarted.apply(log[i], i) for i in range(at + 1, len(log))]

    assert again == applied[at + 1:]
    assert restarted.seen() == uninterrupted.seen()
    assert restarted.policy.n_updates == uninterrupted.policy.n_updates
    assert checksum(restarted) == checksum(uninterrupted)


def test_the_window_is_by_offset():
    learner = Learner(SETTINGS, seen_window=3)
    log = [outcome(i, r) for i, r in enumerate([1, 2, 1, 3, 4, 5, 1])]
    assert [learner.apply(o, i) for i, o in enumerate(log)] == [True, True, False, True, True, True, True]
    assert learner.seen() == {"q4": 4, "q5": 5, "q1": 6}
    with pytest.raises(ValueError):
        learner.remember(log[0], 7)  # not in the state: it must be applied


# -- on the real broker ---------------------------------------------------------------------------


async def run_learner(settings, stop):
    worker = LearnerWorker(settings)
    return worker, asyncio.create_task(worker.run(stop))


@pytest.mark.integration
async def test_a_restarted_learner_worker_refuses_re_emitted_outcomes(settings):
    """Outcomes re-emitted after the learner's restart, whose first copy is in its snapshot."""
    live = settings.model_copy(update={"models": MODELS, "snapshot_every_n": 1_000, "snapshot_every_s": 0.3})
    first_half = [outcome(i, i) for i in range(40)]
    async with make_producer(live) as producer:
        for o in first_half:
            await producer.send(live.topic("outcomes"), encode(o), key=o.request_id.encode())
        await producer.flush()

        stop = asyncio.Event()
        worker, task = await run_learner(live, stop)
        deadline = time.monotonic() + 30
        while worker.published == 0 or worker.learner.offset < 39:
            assert not task.done() and time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        task.cancel()  # a crash: no clean stop, nothing more published
        await asyncio.gather(task, return_exceptions=True)

        # The feedback worker re-emits ten outcomes already in the snapshot, then new ones come.
        tail = [outcome(40 + i, i) for i in range(10)] + [outcome(50 + i, 100 + i) for i in range(20)]
        for o in tail:
            await producer.send(live.topic("outcomes"), encode(o), key=o.request_id.encode())
        await producer.flush()

        stop = asyncio.Event()
        restarted, task = await run_learner(live, stop)
        deadline = time.monotonic() + 30
        while restarted.learner.offset < 69 or restarted.published == 0:
            assert not task.done() and time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()
        await task

    assert restarted.rebuilt == 40
    assert restarted.learner.duplicates == 10
    assert restarted.learner.policy.n_updates == 60
    audit = await audit_learner(live)
    assert audit.checksums_equal and audit.snapshots > 1
    assert (audit.applied, audit.applied_twice, audit.not_applied) == (60, 0, 0)


# -- kill -9 mid-replay ---------------------------------------------------------------------------

KILLS = (
    Kill(("router",), after_decisions=50),
    Kill(("feedback",), after_decisions=100),
    Kill(("learner",), after_decisions=150),
    Kill(("router", "feedback", "learner"), after_decisions=200),
)


@pytest.mark.integration
async def test_kill_9_every_worker_mid_replay(settings, data_dir, tmp_path):
    options = ChaosOptions(requests=260, test_rows=40, rate_per_s=40.0, kills=KILLS)
    result = await run_scenario("kill-9 router, feedback, learner, then all", settings, data_dir,
                                tmp_path / "logs", options)
    print("\n" + result.summary())
    assert result.kills_done == len(KILLS)
    assert result.events_in == options.requests
    assert result.decided == options.requests          # every request has a decision
    assert result.lost == 0                            # ... and an outcome, applied
    assert result.applied == options.requests
    assert result.applied_twice == 0
    assert result.recovered_checksum_equal
    # A router killed between producing a decision and committing its request offset decides
    # that request again on restart; the join refuses every second decision.
    assert result.details["duplicate_decisions_refused"] == result.details["duplicate_decisions"]
    assert result.details["outcome_duplicates_on_topic"] >= 0
    assert result.details["late_rewards"] == 0


@pytest.mark.integration
async def test_a_router_killed_before_its_commit_decides_again_and_the_join_refuses_the_copy(
        settings, tmp_path, monkeypatch):
    """Killed between producing its decisions and committing the requests' offsets, a routing
    worker's successor decides those requests again: the feedback worker refuses every second
    decision as ``duplicate_decision`` and each request still has exactly one outcome."""
    from aiokafka import AIOKafkaConsumer

    from deploy.chaos import read_topic
    from deploy.local import LocalLoop
    from router.worker import RoutingWorker
    from schemas import DeadLetter, ModelResponse, RewardEvent, RouteDecision, RouteRequest, decode

    live = settings.model_copy(update={"models": MODELS, "featuriser": "hashing://?dim=16", "reward_wait_s": 30.0})
    n = 12
    async with make_producer(live) as producer:
        for i in range(n):
            await producer.send(live.topic("requests"), encode(RouteRequest(request_id=f"r{i}", prompt=f"p {i}")),
                                key=f"r{i}".encode())
        await producer.flush()

    real_commit = AIOKafkaConsumer.commit
    stuck = asyncio.Event()

    async def killed_before_commit(self, *args, **kwargs):
        stuck.set()
        await asyncio.Event().wait()  # never: the process dies here

    monkeypatch.setattr(AIOKafkaConsumer, "commit", killed_before_commit)
    first = RoutingWorker(live)
    task = asyncio.create_task(first.run(asyncio.Event()))
    await asyncio.wait_for(stuck.wait(), 30)
    decided_first = first.router.stats.decisions
    task.cancel()  # the "kill": nothing more runs, nothing is committed
    await asyncio.gather(task, return_exceptions=True)
    monkeypatch.setattr(AIOKafkaConsumer, "commit", real_commit)

    second = RoutingWorker(live)
    stop = asyncio.Event()
    task = asyncio.create_task(second.run(stop))
    deadline = time.monotonic() + 30
    while second.router.stats.decisions < n:
        assert not task.done() and time.monotonic() < deadline
        await asyncio.sleep(0.1)
    stop.set()
    await task

    records = await read_topic(live, "decisions")
    first_decision = {}
    for record in records:
        first_decision.setdefault(record.key, decode(RouteDecision, record.value))
    duplicates = len(records) - len(first_decision)
    assert decided_first > 0 and duplicates == decided_first and len(first_decision) == n

    feedback = LocalLoop(live, log_dir=tmp_path / "logs", start_broker=False, workers=("feedback",))
    await asyncio.to_thread(feedback.start)
    try:
        async with make_producer(live) as producer:  # the caller answers the first decision it saw
            for key, decision in first_decision.items():
                await producer.send(live.topic("responses"), encode(ModelResponse(
                    request_id=decision.request_id, model=decision.model, cost_usd=0.001)), key=key)
                await producer.send(live.topic("rewards"), encode(RewardEvent(
                    reward_id=f"w-{decision.request_id}", request_id=decision.request_id, quality=1.0)), key=key)
            await producer.flush()
        deadline = time.monotonic() + 40
        while len(outcomes := await read_topic(live, "outcomes", idle_ms=500)) < n:
            feedback.check_alive()
            assert time.monotonic() < deadline, f"{len(outcomes)} outcomes"
        letters = [decode(DeadLetter, r.value) for r in await read_topic(live, "deadletter")]
    finally:
        await asyncio.to_thread(feedback.stop)
    assert sorted(r.key for r in outcomes) == sorted(first_decision)  # one outcome per request
    assert [letter.reason for letter in letters] == ["duplicate_decision"] * duplicates
    print(f"\n{duplicates} requests decided twice after the kill; {duplicates} second decisions refused")
