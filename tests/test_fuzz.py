"""Bad input on every input topic, forged snapshots, duplicates and disorder, on the real broker.

The fuzz cases come from hypothesis (deploy.chaos.fuzz_cases and snapshot_cases) and are
produced in one batch to a running routing worker, feedback worker and learner; then every
record is accounted for: used, or dead-lettered with a reason its case allows (snapshots:
applied, stale or refused), and the workers still run and still serve a last good request.
A router with ROUTELOOP_SNAPSHOT_KEY refuses forged and corrupted snapshots and keeps its last
good model; every event sent twice and shuffled gives the model of the clean sequence.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import numpy as np
import pytest

from deploy.chaos import _TOO_LARGE, run_fuzz
from deploy.kafka import make_producer
from deploy.local import LocalLoop, free_port_block
from deploy.topics import iter_topic
from router.policy import make_policy
from router.snapshot import decode_snapshot, encode_snapshot
from router.worker import RoutingWorker
from schemas import (DeadLetter, ModelResponse, Preference, RewardEvent, RouteDecision, RouteRequest, decode,
                     encode)
from streams.join import RewardJoiner
from streams.learner import Learner, LearnerWorker

pytestmark = pytest.mark.integration


async def test_fuzz_every_input_topic_in_one_batch(settings, tmp_path):
    # (The feedback worker's oversized records: see the test at the end of this file.)
    result = await run_fuzz(settings, tmp_path / "logs", n=300, n_snapshots=30, seed=5, oversize_on_feedback=False)
    print("\n" + result.summary())
    for wrong in result.wrong:
        print("  ", wrong)
    assert result.crashes == 0, result.crashed
    assert not result.stalled
    assert result.unaccounted == 0
    assert result.wrong == []
    assert result.processed + result.deadlettered + result.snapshots["in"] - 0 >= result.cases


# -- forged snapshots, end to end ----------------------------------------------------------------

ARMS = ("small", "large")
DIM = 16


async def until(check, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not (result := await check()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)
    return result


async def test_a_keyed_router_refuses_forged_snapshots_and_keeps_its_last_good_model(settings):
    live = settings.model_copy(update={"models": ARMS, "featuriser": f"hashing://?dim={DIM}",
                                       "http_port": free_port_block(1), "snapshot_key": "the-key"})
    policy = make_policy("decomposed-ts", arms=list(ARMS), dim=DIM, tau=0.01)
    rng = np.random.default_rng(0)
    for i in range(30):
        policy.learn(i % 2, rng.standard_normal(DIM), 0.9 if i % 2 else 0.1, 0.001)
    good = encode_snapshot(policy, 5, 29, key=b"the-key")
    frames = [  # one at a time: of one fetch the router looks at the newest frame first
        (encode_snapshot(policy, 1, 29), "unsigned"),
        (encode_snapshot(policy, 2, 29, key=b"a guess"), "bad_signature"),
        (good.replace(b'"version":5', b'"version":7'), "bad_signature"),  # re-versioned after signing
        (good[:-1] + bytes([good[-1] ^ 1]), "bad_checksum"),
        (good, "applied"),
        (encode_snapshot(policy, 4, 20, key=b"the-key"), "stale"),
        (encode_snapshot(policy, 9, 40, key=b"wrong"), "bad_signature"),
    ]
    worker = RoutingWorker(live)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{live.http_port}",
                                         timeout=aiohttp.ClientTimeout(total=10)) as http:
            async def healthy():
                try:
                    async with http.get("/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            async def model():
                async with http.get("/v1/model") as response:
                    return await response.json()

            await until(healthy, what="the router did not become healthy")
            # Before any snapshot: the prior, and every decision says so.
            async with http.post("/v1/route", json={"prompt": "hello"}) as response:
                cold = await response.json()
            assert (cold["cold_start"], cold["snapshot_version"]) == (True, 0)
            assert (await model())["cold_start"] is True

            async with make_producer(live) as producer:
                await producer.send_and_wait(live.topic("requests"), encode(RouteRequest(
                    request_id="cold-kafka", prompt="hi")), key=b"cold-kafka")
                for n, (frame, outcome) in enumerate(frames, start=1):
                    await producer.send_and_wait(live.topic("snapshots"), frame, key=b"model")
                    await until(lambda: _counted(model, n), what=f"frame {n} ({outcome}) not counted")
            info = await model()
            async with http.post("/v1/route", json={"prompt": "hello"}) as response:
                warm = await response.json()
    finally:
        stop.set()
        await task
    assert info["snapshots"] == {"applied": 1, "stale": 1, "refused": 5,
                                 "refusals": {"unsigned": 1, "bad_signature": 3, "bad_checksum": 1}}
    assert (info["snapshot_version"], info["cold_start"], info["n_updates"]) == (5, False, 30)
    assert (warm["snapshot_version"], warm["cold_start"]) == (5, False)  # the last good model
    found = {r.key: decode(RouteDecision, r.value) async for r in iter_topic(live, "decisions")}
    assert found[b"cold-kafka"].cold_start and found[b"cold-kafka"].snapshot_version == 0


async def _counted(model, n):
    counts = (await model())["snapshots"]
    return counts["applied"] + counts["stale"] + counts["refused"] == n


# -- duplicates and disorder through the workers -------------------------------------------------

N = 60


def triples(n=N, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        model = ARMS[i % 2]
        out.append((
            RouteDecision(request_id=f"q{i}", model=model, propensity=0.5, distribution={m: 0.5 for m in ARMS},
                          preference=Preference(quality=0.8, cost=0.2),
                          features=rng.standard_normal(DIM).astype(np.float32), featuriser=f"hashing-{DIM}",
                          policy="decomposed-ts", snapshot_version=0, cold_start=True, created_at=0.0),
            ModelResponse(request_id=f"q{i}", model=model, cost_usd=0.001 * (1 + i % 3), created_at=0.0),
            RewardEvent(reward_id=f"r{i}", request_id=f"q{i}", quality=float(rng.random()), created_at=0.0),
        ))
    return out


def clean_model(live, events):
    """The pure joiner and learner on the clean sequence: decision, response, reward, in order."""
    joiner = RewardJoiner.from_settings({}, live)
    learner = Learner(live)
    offset = 0
    for t, (d, r, w) in enumerate(events):
        for event, handle in ((d, joiner.on_decision), (r, joiner.on_response), (w, joiner.on_reward)):
            for outcome in handle(event, float(t)).outcomes:
                learner.apply(outcome, offset)
                offset += 1
    return learner.policy


async def read_all(live, short):
    return [r async for r in iter_topic(live, short)]


async def test_every_event_twice_and_shuffled_through_the_workers_gives_the_clean_model(settings, tmp_path):
    live = settings.model_copy(update={"models": ARMS, "reward_wait_s": 30.0, "snapshot_every_n": 1_000,
                                       "snapshot_every_s": 0.5})
    events = triples()
    dirty = [(short, e) for d, r, w in events for short, e in (("decisions", d), ("responses", r), ("rewards", w))]
    dirty = dirty * 2
    np.random.default_rng(1).shuffle(dirty)  # 360 events, all within one wait window
    feedback = LocalLoop(live, log_dir=tmp_path / "logs", start_broker=False, workers=("feedback",))
    await asyncio.to_thread(feedback.start)
    learner = LearnerWorker(live)
    stop = asyncio.Event()
    task = asyncio.create_task(learner.run(stop))
    try:
        async with make_producer(live) as producer:
            for short, event in dirty:
                await producer.send(live.topic(short), encode(event), key=event.request_id.encode())
            await producer.flush()

            async def learned():
                feedback.check_alive()
                assert not task.done()
                policy = learner.learner.policy
                return policy is not None and policy.n_updates == N and learner.published
            await until(learned, timeout_s=60, what="the learner did not learn every outcome")
            await asyncio.sleep(1.5)  # nothing more comes
            outcomes = await read_all(live, "outcomes")
            before = decode_snapshot(learner.learner.snapshot_frame()).header.sha256
            # The outcomes twice too (a feedback worker re-emitting everything): all refused.
            for record in outcomes:
                await producer.send(live.topic("outcomes"), record.value, key=record.key)
            await producer.flush()
            await until(lambda: _at(learner, 2 * len(outcomes) - 1), what="the learner did not read the copies")
        after = decode_snapshot(learner.learner.snapshot_frame()).header.sha256
    finally:
        stop.set()
        await task
        await asyncio.to_thread(feedback.stop)
    assert len(outcomes) == N and len({r.key for r in outcomes}) == N  # one outcome per request
    letters = [r for r in await read_all(live, "deadletter")]
    reasons = Counter(decode(DeadLetter, r.value).reason for r in letters)
    assert reasons == {"duplicate_decision": N, "duplicate_response": N, "duplicate_reward": N}
    assert learner.learner.duplicates == N and after == before

    got, expected = learner.learner.policy, clean_model(live, events)
    # Another order of the same outcomes: the same sums up to rounding, the same decisions.
    for name, array in expected.arrays().items():
        np.testing.assert_allclose(got.arrays()[name], array, rtol=1e-12, atol=1e-12)
    X = np.random.default_rng(2).standard_normal((200, DIM))
    for w in (1.0, 0.8, 0.5, 0.0):
        assert (got.greedy(X, w) == expected.greedy(X, w)).all()


async def _at(learner, offset):
    return learner.learner.offset >= offset


async def test_an_event_over_the_size_limit_on_a_feedback_topic_is_dead_lettered(settings, tmp_path):
    live = settings.model_copy(update={"reward_wait_s": 30.0})
    feedback = LocalLoop(live, log_dir=tmp_path / "logs", start_broker=False, workers=("feedback",))
    await asyncio.to_thread(feedback.start)
    try:
        raw = b'{"request_id": "big", "padding": "' + b"p" * _TOO_LARGE + b'"}'
        # Then, on the same partition, a reward keyed by another id: dead-lettered at once.
        marker = encode(RewardEvent(reward_id="m", request_id="marker", quality=0.5))
        async with make_producer(live) as producer:
            await producer.send_and_wait(live.topic("rewards"), raw, key=b"big")
            await producer.send_and_wait(live.topic("rewards"), marker, key=b"big")

        async def dead_lettered():
            feedback.check_alive()
            reasons = [decode(DeadLetter, r.value, max_bytes=64 << 20).reason
                       for r in await read_all(live, "deadletter")]
            return reasons if "key_mismatch" in reasons else None
        reasons = await until(dead_lettered, timeout_s=30, what="the feedback worker handled nothing")
    finally:
        log = (tmp_path / "logs" / "feedback.log").read_text(errors="replace")
        await asyncio.to_thread(feedback.stop)
    assert reasons == ["too_large", "key_mismatch"]
    assert "Crashed reason=" not in log
