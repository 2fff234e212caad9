"""The feedback worker end to end: a real Faust worker process on the embedded broker.

The worker runs as ``python -m streams.app`` (what ``routeloop worker feedback`` runs) with
its settings in ``ROUTELOOP_*`` variables. The test produces decisions, responses and
rewards in a shuffled order, with duplicates, orphans and malformed messages on every
topic, and counts exactly what comes out on the outcomes and deadletter topics. Topics are
read until a fetch comes back empty: the embedded broker's end offsets are wrong.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from deploy.kafka import client_kwargs, make_consumer, make_producer
from deploy.process import die_with_parent
from schemas.codec import decode, encode
from schemas.events import (
    DeadLetter,
    ModelResponse,
    Outcome,
    Preference,
    RewardEvent,
    RouteDecision,
)
from schemas.reward import reward as barp_reward
from schemas.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
N_REQUESTS = 200
N_NO_REWARD = 20
N_DUPLICATE_REWARDS = 20
N_ORPHAN_REWARDS = 10
N_LATE = 5


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTELOOP_")}
    env.update(settings.to_env())
    env["ROUTELOOP_WORKER_ID"] = "test-worker"
    env["PYTHONPATH"] = str(REPO)
    return env


def start_worker(settings: Settings, log_path: Path, program: str | None = None) -> subprocess.Popen[bytes]:
    """``python -m streams.app``, or ``python -c program``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, *(["-c", program] if program else ["-m", "streams.app"])],
            cwd=REPO,
            env=worker_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # No stray worker if the test process is killed (None off the main thread).
            preexec_fn=die_with_parent(),  # noqa: PLW1509
        )


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


async def wait_for_topic(settings: Settings, topic: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        deadline = time.monotonic() + 30.0
        while topic not in await admin.list_topics():  # lists all topics: creates none
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no topic {topic}:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


class TopicReader:
    """Reads one single-partition topic from the beginning, without a consumer group."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
        self.tp = TopicPartition(topic, 0)
        self.records: list = []

    async def __aenter__(self) -> Self:
        await self.consumer.start()
        self.consumer.assign([self.tp])
        await self.consumer.seek_to_beginning(self.tp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def fetch(self, timeout_ms: int = 500) -> int:
        batch = await self.consumer.getmany(self.tp, timeout_ms=timeout_ms)
        got = batch.get(self.tp, [])
        self.records.extend(got)
        return len(got)

    async def read_until(self, count: int, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> list:
        """Fetch until ``count`` records arrived, then until a fetch comes back empty."""
        while len(self.records) < count:
            if proc.poll() is not None:
                pytest.fail(f"the worker exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.tp.topic}: {len(self.records)} of {count} records before the deadline; "
                    f"worker log:\n{log.read_text()[-5000:]}"
                )
            await self.fetch()
        while await self.fetch(timeout_ms=1_000):
            pass
        return self.records


def make_decision(rid: str, rng: random.Random) -> RouteDecision:
    model = rng.choice(["small", "large"])
    return RouteDecision(
        request_id=rid,
        model=model,
        propensity=0.6,
        distribution={"small": 0.6, "large": 0.4} if model == "small" else {"small": 0.4, "large": 0.6},
        preference=Preference(quality=rng.random() + 0.01, cost=rng.random()),
        features=np.asarray([rng.uniform(-1, 1) for _ in range(8)], dtype=np.float32),
        featuriser="hashing://?dim=8",
        policy="decomposed-ts",
        snapshot_version=3,
        cold_start=False,
    )


def malformed(kind: str) -> list[bytes]:
    """Four bad messages for a topic: not JSON, a NaN literal, a "NaN" number, a missing field."""
    good = {
        "decisions": make_decision("bad", random.Random(0)).model_dump(mode="json"),
        "responses": {"request_id": "bad", "model": "small", "cost_usd": 0.001},
        "rewards": {"reward_id": "bad", "request_id": "bad", "quality": 0.5},
    }[kind]
    field = {"decisions": "propensity", "responses": "cost_usd", "rewards": "quality"}[kind]
    nan_literal = orjson.dumps({**good, field: 0.123456}).replace(b"0.123456", b"NaN")
    missing = {k: v for k, v in good.items() if k != field}
    return [b"\xff not json {", nan_literal, orjson.dumps({**good, field: "NaN"}), orjson.dumps(missing)]


async def test_feedback_worker_joins_and_dead_letters(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(
        update={
            "reward_wait_s": 3.0,
            "default_quality": 0.0,
            "tau": 0.01,
            "session_timeout_ms": 4_000,
            "heartbeat_interval_ms": 500,
            "data_dir": str(tmp_path / "data"),
            "log_level": "WARNING",
        }
    )
    rng = random.Random(42)
    decisions = {f"req-{i:04d}": make_decision(f"req-{i:04d}", rng) for i in range(N_REQUESTS)}
    responses = {
        rid: ModelResponse(request_id=rid, model=d.model, cost_usd=rng.choice([0.0, 0.002, 0.02]))
        for rid, d in decisions.items()
    }
    rewarded = sorted(decisions)[N_NO_REWARD:]
    defaulted = sorted(decisions)[:N_NO_REWARD]
    rewards = {
        rid: RewardEvent(reward_id=f"w-{rid}", request_id=rid, quality=round(rng.random(), 3)) for rid in rewarded
    }
    messages: list[tuple[str, bytes | None, bytes]] = []
    messages += [("decisions", rid.encode(), encode(e)) for rid, e in decisions.items()]
    messages += [("responses", rid.encode(), encode(e)) for rid, e in responses.items()]
    messages += [("rewards", rid.encode(), encode(e)) for rid, e in rewards.items()]
    # the same reward twice (an evaluator retrying): applied once
    messages += [("rewards", rid.encode(), encode(rewards[rid])) for rid in rng.sample(rewarded, N_DUPLICATE_REWARDS)]
    # rewards whose decision never comes
    for i in range(N_ORPHAN_REWARDS):
        orphan = RewardEvent(reward_id=f"w-orphan-{i}", request_id=f"orphan-{i}", quality=0.5)
        messages.append(("rewards", orphan.request_id.encode(), encode(orphan)))
    # malformed messages on every topic, and one event keyed by something else than its request id
    n_malformed = 0
    for kind in ("decisions", "responses", "rewards"):
        for raw in malformed(kind):
            messages.append((kind, b"bad", raw))
            n_malformed += 1
    stray = RewardEvent(reward_id="w-stray", request_id="stray", quality=0.5)
    messages.append(("rewards", b"not-the-request-id", encode(stray)))
    rng.shuffle(messages)

    log_path = tmp_path / "worker.log"
    proc = start_worker(settings, log_path)
    try:
        started = time.monotonic()
        async with make_producer(settings) as producer:
            for short, key, value in messages:
                await producer.send(settings.topic(short), value, key=key)
            await producer.flush()

            deadline = time.monotonic() + 45.0
            async with TopicReader(settings, settings.topic("outcomes")) as outcomes_reader:
                records = await outcomes_reader.read_until(N_REQUESTS, deadline, proc, log_path)
                elapsed = time.monotonic() - started
                outcomes = [decode(Outcome, r.value) for r in records]
                assert len(outcomes) == N_REQUESTS
                assert [r.key for r in records] == [o.request_id.encode() for o in outcomes]
                by_id = {o.request_id: o for o in outcomes}
                assert sorted(by_id) == sorted(decisions)
                completions = collections.Counter(o.completion for o in outcomes)
                assert completions == {"joined": N_REQUESTS - N_NO_REWARD, "defaulted": N_NO_REWARD}
                for rid, out in by_id.items():
                    d, resp = decisions[rid], responses[rid]
                    quality = rewards[rid].quality if rid in rewards else 0.0
                    assert out.completion == ("joined" if rid in rewards else "defaulted")
                    assert (out.model, out.quality, out.cost_usd) == (d.model, quality, resp.cost_usd)
                    assert out.reward == pytest.approx(barp_reward(quality, resp.cost_usd, d.preference.quality, 0.01))
                    assert (out.propensity, out.distribution, out.snapshot_version) == (
                        d.propensity, d.distribution, d.snapshot_version,
                    )  # fmt: skip
                    assert out.decided_at == d.created_at
                    # (a Preference is re-normalised at every validation: equal to the last ulp or so)
                    assert out.preference.quality == pytest.approx(d.preference.quality, abs=1e-12)
                    np.testing.assert_array_equal(out.features, d.features)

                # After the close: rewards with new ids are late, the applied ones duplicates.
                late_rids = rng.sample(defaulted, N_LATE)
                for rid in late_rids:
                    late = RewardEvent(reward_id=f"late-{rid}", request_id=rid, quality=1.0)
                    await producer.send(settings.topic("rewards"), encode(late), key=rid.encode())
                resent = rng.sample(rewarded, N_LATE)
                for rid in resent:
                    await producer.send(settings.topic("rewards"), encode(rewards[rid]), key=rid.encode())
                await producer.flush()

                expected = collections.Counter(
                    {
                        "duplicate_reward": N_DUPLICATE_REWARDS + N_LATE,
                        "orphan_reward": N_ORPHAN_REWARDS,
                        "late_reward": N_LATE,
                        "key_mismatch": 1,
                        "invalid_json": 6,  # not JSON and the NaN literal, on each topic
                        "invalid_event": 6,  # the "NaN" string and the missing field
                    }
                )
                assert n_malformed == 12
                async with TopicReader(settings, settings.topic("deadletter")) as dl_reader:
                    dl_records = await dl_reader.read_until(sum(expected.values()), deadline, proc, log_path)
                letters = [decode(DeadLetter, r.value) for r in dl_records]
                assert collections.Counter(letter.reason for letter in letters) == expected
                # no more outcomes came with the late and duplicate rewards
                while await outcomes_reader.fetch(timeout_ms=500):
                    pass
                assert len(outcomes_reader.records) == N_REQUESTS

        # Every dead letter names its source and carries the raw bytes.
        for letter in letters:
            assert letter.worker == "feedback@test-worker"
            assert letter.source_topic in {settings.topic(s) for s in ("decisions", "responses", "rewards")}
            assert letter.partition is not None and letter.offset is not None
        late_letters = [x for x in letters if x.reason == "late_reward"]
        assert sorted(decode(RewardEvent, base64.b64decode(x.raw_b64)).request_id for x in late_letters) == sorted(
            late_rids
        )
        bad_raw = {base64.b64decode(x.raw_b64) for x in letters if x.reason.startswith("invalid_")}
        assert b"\xff not json {" in bad_raw
        orphans = [x for x in letters if x.reason == "orphan_reward"]
        assert sorted(decode(RewardEvent, base64.b64decode(x.raw_b64)).reward_id for x in orphans) == sorted(
            f"w-orphan-{i}" for i in range(N_ORPHAN_REWARDS)
        )

        # It survived the bad input, and it stops cleanly on SIGTERM.
        assert proc.poll() is None, log_path.read_text()[-5000:]
        print(f"\n{len(messages)} events -> {N_REQUESTS} outcomes in {elapsed:.1f} s (window 3 s)")
    finally:
        code = stop_worker(proc)
    assert code == 0, log_path.read_text()[-5000:]


async def test_restarted_worker_recovers_the_join_state(settings: Settings, tmp_path: Path) -> None:
    """Decisions and responses joined by one worker process, rewards by the next one.

    The memory store recovers from the changelog alone, so every pending entry must come
    back; on this broker that needs the true changelog end (streams.app.install_true_highwaters).
    """
    settings = settings.model_copy(
        update={
            "reward_wait_s": 60.0,
            "session_timeout_ms": 4_000,
            "heartbeat_interval_ms": 500,
            "data_dir": str(tmp_path / "data"),
            "log_level": "WARNING",
        }
    )
    n = 300
    rng = random.Random(7)
    decisions = {f"r-{i}": make_decision(f"r-{i}", rng) for i in range(n)}
    first_log, second_log = tmp_path / "worker1.log", tmp_path / "worker2.log"
    proc = start_worker(settings, first_log)
    try:
        async with make_producer(settings) as producer:
            for rid, d in decisions.items():
                await producer.send(settings.topic("decisions"), encode(d), key=rid.encode())
                response = ModelResponse(request_id=rid, model=d.model, cost_usd=0.001)
                await producer.send(settings.topic("responses"), encode(response), key=rid.encode())
            await producer.flush()

            # Wait until the first worker wrote both pieces of every request to its changelog.
            # (Not before the worker created it: asking for an unknown topic's metadata makes
            # the broker create it with its default partition count, which the worker refuses.)
            changelog = f"{settings.topic_prefix}feedback-join-changelog"
            await wait_for_topic(settings, changelog, proc, first_log)
            consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
            await consumer.start()
            try:
                tps = [TopicPartition(changelog, p) for p in range(settings.partitions)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                seen, deadline = 0, time.monotonic() + 30.0
                while seen < 2 * n:
                    assert time.monotonic() < deadline, f"{seen} changelog records:\n{first_log.read_text()[-3000:]}"
                    assert proc.poll() is None, first_log.read_text()[-3000:]
                    batch = await consumer.getmany(timeout_ms=500)
                    seen += sum(len(records) for records in batch.values())
            finally:
                await consumer.stop()
            assert stop_worker(proc) == 0, first_log.read_text()[-3000:]

            proc = start_worker(settings, second_log)
            for rid in decisions:
                reward = RewardEvent(reward_id=f"w-{rid}", request_id=rid, quality=0.75)
                await producer.send(settings.topic("rewards"), encode(reward), key=rid.encode())
            await producer.flush()
            async with TopicReader(settings, settings.topic("outcomes")) as reader:
                records = await reader.read_until(n, time.monotonic() + 40.0, proc, second_log)
        outcomes = [decode(Outcome, r.value) for r in records]
        assert sorted(o.request_id for o in outcomes) == sorted(decisions)
        assert {(o.completion, o.quality) for o in outcomes} == {("joined", 0.75)}
        async with TopicReader(settings, settings.topic("deadletter")) as reader:
            while await reader.fetch(timeout_ms=1_000):
                pass
        # At-least-once: an event fetched just before the restarted worker's seek to the
        # committed offsets may come twice (see streams.app._FlowControl); nothing else.
        reasons = {decode(DeadLetter, r.value).reason for r in reader.records}
        assert reasons <= {"duplicate_decision", "duplicate_response", "duplicate_reward"}, reasons
    finally:
        code = stop_worker(proc)
    assert code == 0, second_log.read_text()[-3000:]


#: ``python -c`` program: the feedback worker, except that its outcomes are never produced, so
#: their acknowledgements never come (the window between an outcome and its tombstone, held open).
UNACKNOWLEDGED_OUTCOMES = """
import asyncio, os
import faust.transport.drivers.aiokafka as driver
from schemas.settings import Settings
from streams.app import run_feedback_worker

settings = Settings.load()
outcomes, real_send = settings.topic("outcomes"), driver.Producer.send

in_flight = []  # as a real producer does, keep each pending produce until it resolves

async def send(self, topic, *args, **kwargs):
    if topic == outcomes:
        in_flight.append(asyncio.get_running_loop().create_future())
        return in_flight[-1]
    return await real_send(self, topic, *args, **kwargs)

driver.Producer.send = send
run_feedback_worker(settings, worker_id=os.environ["ROUTELOOP_WORKER_ID"])
"""


def metric(port: int, name: str) -> float:
    """A sample of the worker's /metrics (0 before the first)."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_no_tombstone_before_its_outcome_is_acknowledged_so_a_kill_9_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """A worker whose outcomes are never acknowledged writes no join tombstone to its changelog
    and commits no source offset past a closing event; killed -9 in that state, its successor
    emits every outcome. Writing the tombstone at once, the successor would find it and drop
    the replayed event as a duplicate; committing past the closing event (Faust's own commit
    rule, see streams.app._AtLeastOnceConsumer), it would never see the event again: either
    way the outcome is lost. (tests/test_idempotence.py replays every crash point without a
    broker; test_the_worker_never_commits_past_a_message_it_has_not_acknowledged pins the
    commit rule.)"""
    from deploy.local import free_port_block

    settings = settings.model_copy(
        update={
            "reward_wait_s": 60.0,  # no sweep closes anything here
            "session_timeout_ms": 4_000,
            "heartbeat_interval_ms": 500,
            "data_dir": str(tmp_path / "data"),
            "log_level": "WARNING",
            "http_port": free_port_block(3),  # the feedback worker's /metrics at + 2
        }
    )
    n = 100
    rng = random.Random(11)
    decisions = {f"k-{i}": make_decision(f"k-{i}", rng) for i in range(n)}
    messages = []
    for rid, d in decisions.items():
        messages += [
            ("decisions", encode(d)),
            ("responses", encode(ModelResponse(request_id=rid, model=d.model, cost_usd=0.001))),
            ("rewards", encode(RewardEvent(reward_id=f"w-{rid}", request_id=rid, quality=0.5))),
        ]
        messages[-3:] = rng.sample(messages[-3:], 3)  # any piece may be the one that closes
    changelog = f"{settings.topic_prefix}feedback-join-changelog"

    first_log, second_log = tmp_path / "held.log", tmp_path / "worker.log"
    proc = start_worker(settings, first_log, UNACKNOWLEDGED_OUTCOMES)
    try:
        async with make_producer(settings) as producer:
            for short, value in messages:
                rid = decode(TOPIC_EVENT[short], value).request_id
                await producer.send(settings.topic(short), value, key=rid.encode())
            await producer.flush()
        deadline = time.monotonic() + 60.0
        joined = 'routeloop_outcomes_total{completion="joined"}'
        while metric(settings.http_port + 2, joined) < n:  # every outcome sent, none acknowledged
            assert proc.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, first_log.read_text()[-3000:]
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # a commit interval: what would reach the changelog did
        entries = await read_changelog(settings, changelog)
        assert len(entries) == 2 * n  # the first two pieces of every request, pending
        assert not [e for e in entries if e and "closed_at" in e]
    finally:
        proc.kill()  # kill -9 between the outcomes and their tombstones
        proc.wait()

    proc = start_worker(settings, second_log)
    try:
        async with TopicReader(settings, settings.topic("outcomes")) as reader:
            records = await reader.read_until(n, time.monotonic() + 60.0, proc, second_log)
        outcomes = [decode(Outcome, r.value) for r in records]
        assert sorted(o.request_id for o in outcomes) == sorted(decisions)  # each once: none was acknowledged
        assert {o.completion for o in outcomes} == {"joined"}
        async with TopicReader(settings, settings.topic("deadletter")) as dl_reader:
            while await dl_reader.fetch(timeout_ms=1_000):
                pass
        reasons = {decode(DeadLetter, r.value).reason for r in dl_reader.records}
        assert reasons <= {"duplicate_decision", "duplicate_response", "duplicate_reward"}, reasons
        # ... and now the tombstones follow their acknowledged outcomes.
        deadline = time.monotonic() + 20.0
        while len([e for e in await read_changelog(settings, changelog) if e and "closed_at" in e]) < n:
            assert time.monotonic() < deadline, second_log.read_text()[-3000:]
    finally:
        code = stop_worker(proc)
    assert code == 0, second_log.read_text()[-3000:]


TOPIC_EVENT = {"decisions": RouteDecision, "responses": ModelResponse, "rewards": RewardEvent}


async def read_changelog(settings: Settings, changelog: str) -> list[dict | None]:
    """Every record of the join table's changelog, decoded (None for a deletion)."""
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(changelog, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        values: list[dict | None] = []
        while batch := await consumer.getmany(timeout_ms=1_000):
            values += [None if r.value is None else orjson.loads(r.value) for rs in batch.values() for r in rs]
        return values
    finally:
        await consumer.stop()


async def test_the_worker_consumer_waits_at_most_fetch_max_wait_ms(tmp_path: Path) -> None:
    """Faust's literal 1.5 s fetch wait, replaced for this app only (streams.app.install_fetch_max_wait)."""
    import faust

    from streams.app import FETCH_MAX_WAIT_MS, create_app

    ours = create_app(Settings(data_dir=str(tmp_path)), worker_id="fetch-wait")
    other = faust.App("not-routeloop", broker="kafka://127.0.0.1:1")
    waits = []
    for app in (ours, other):
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        waits.append(consumer._fetch_max_wait_ms)
        await consumer.stop()
    assert waits == [FETCH_MAX_WAIT_MS, 1500]


def test_the_worker_never_commits_past_a_message_it_has_not_acknowledged(tmp_path: Path) -> None:
    """The commit rule of streams.app._AtLeastOnceConsumer, against Faust's own on the same state."""
    from faust.transport.drivers.aiokafka import Consumer as FaustConsumer
    from faust.types.tuples import TP, ConsumerMessage

    from streams.app import create_app

    settings = Settings(data_dir=str(tmp_path))
    topic = settings.topic("decisions")
    tp = TP(topic, 0)

    def consumer_holding(first: int, held: set[int], committed: int | None) -> tuple[object, list]:
        """A worker consumer whose stream took offsets ``first``.. ``first + 5`` and acknowledged
        all but ``held``."""
        consumer = create_app(settings, worker_id=f"commit-{first}-{committed}").consumer
        consumer.app.topics._acking_topics.add(topic)  # what the agent's subscription does
        consumer._committed_offset[tp] = committed
        taken = [ConsumerMessage(topic, 0, offset, 0.0, 0, [], b"k", b"v", None) for offset in range(first, first + 6)]
        for message in taken:  # what a stream does as it takes each message
            message.tracked = True
            consumer._unacked_messages.add(message)
        for message in taken:
            if message.offset not in held:
                assert consumer.ack(message)
        return consumer, taken

    # Nothing committed yet, offset 0 held: Faust commits 6, over it.
    faust_own, _ = consumer_holding(0, {0}, None)
    assert FaustConsumer._new_offset(faust_own, tp) == 6
    consumer, taken = consumer_holding(0, {0}, None)
    assert consumer._new_offset(tp) is None
    assert consumer.ack(taken[0])
    assert consumer._new_offset(tp) == 6

    # Committed 10, offset 10 held (a head gap of one): Faust commits 16, over it.
    faust_own, _ = consumer_holding(10, {10}, 10)
    assert FaustConsumer._new_offset(faust_own, tp) == 16
    consumer, taken = consumer_holding(10, {10}, 10)
    assert consumer._new_offset(tp) is None

    # Held in the middle: commit up to it, the rest once it is acknowledged.
    consumer, taken = consumer_holding(20, {23}, 20)
    assert consumer._new_offset(tp) == 23
    consumer._committed_offset[tp] = 23
    assert consumer._new_offset(tp) is None
    assert consumer.ack(taken[3])
    assert consumer._new_offset(tp) == 26
