"""Broker trouble: a frozen broker mid-replay, and a broker that comes back empty.

A frozen broker (SIGSTOP for 10 s, then SIGCONT) keeps its data: the worker processes must
ride it out without a restart, the replay must complete with nothing lost, and meanwhile the
routing worker must answer its HTTP callers 503 promptly instead of queueing them. A broker
restarted on the same port is an empty cluster: the routing worker and the learner must say
so and stop (BrokerResetError), the learner keeping its model in a file, instead of carrying
on against a log that does not match their offsets.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from deploy.broker import EmbeddedBroker, _free_port
from deploy.chaos import ChaosOptions, Freeze, run_scenario
from deploy.kafka import BrokerResetError, make_producer
from deploy.local import free_port_block
from deploy.topics import ensure_topics
from router.snapshot import decode_snapshot
from router.worker import PRODUCE_TIMEOUT_S, RoutingWorker
from schemas import Outcome, Preference, RouteRequest, encode
from schemas.settings import Settings
from streams.learner import LearnerWorker



@pytest.mark.integration
async def test_a_broker_frozen_for_10_s_mid_replay(broker, settings, data_dir, tmp_path):
    options = ChaosOptions(requests=200, test_rows=40, rate_per_s=40.0,
                           freezes=(Freeze(after_decisions=60, seconds=10.0, http_probes=8),))
    result = await run_scenario("broker frozen 10 s", settings, data_dir, tmp_path / "logs", options, broker=broker)
    print("\n" + result.summary())
    assert result.freezes_done == 1
    assert result.details["restarted"] == []           # every worker rode it out, no restart
    assert result.decided == result.events_in == options.requests
    assert result.lost == 0 and result.applied == options.requests and result.applied_twice == 0
    assert result.recovered_checksum_equal
    probes = result.details["http_probes_during_freeze"]
    assert len(probes) == 16
    for probe in probes:  # clearly and promptly: 503 broker_unavailable, no caller left waiting
        assert (probe["status"], probe["error"]) == (503, "broker_unavailable"), probes
        # The first callers wait for the acknowledgement timeout; once the broker is known
        # down, the next ones are refused at once.
        assert probe["seconds"] <= (PRODUCE_TIMEOUT_S + 2.0 if probe["wave"] == 1 else 1.0), probes


def outcome(i: int) -> Outcome:
    rng = np.random.default_rng(i)
    return Outcome(
        request_id=f"o{i}", model=("a", "b")[i % 2], features=rng.standard_normal(16).astype(np.float32),
        preference=Preference(quality=0.8, cost=0.2), propensity=0.5, distribution={"a": 0.5, "b": 0.5},
        quality=0.5, cost_usd=0.001, reward=0.0, completion="joined", snapshot_version=0, decided_at=0.0)


async def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


@pytest.mark.integration
async def test_a_broker_that_comes_back_empty_stops_the_router_and_the_learner(tmp_path):
    port = _free_port()
    own = EmbeddedBroker(port, log_path=tmp_path / "broker.log")  # not the session's: it is wiped
    own.start()
    try:
        live = Settings(bootstrap_servers=own.bootstrap_servers, topic_prefix="reset.", partitions=2,
                        models=("a", "b"), featuriser="hashing://?dim=16", http_port=free_port_block(1),
                        snapshot_every_n=5, snapshot_every_s=0.5, data_dir=str(tmp_path / "data"))
        await ensure_topics(live)
        stops = [asyncio.Event(), asyncio.Event()]  # (a router that stops sets its own)
        router, learner = RoutingWorker(live), LearnerWorker(live)
        tasks = [asyncio.create_task(router.run(stops[0])), asyncio.create_task(learner.run(stops[1]))]
        async with make_producer(live) as producer:
            for i in range(20):
                await producer.send(live.topic("outcomes"), encode(outcome(i)), key=f"o{i}".encode())
                request = RouteRequest(request_id=f"r{i}", prompt=f"prompt {i}")
                await producer.send(live.topic("requests"), encode(request), key=f"r{i}".encode())
            await producer.flush()
        await wait_for(lambda: learner.published and learner.learner.offset == 19 and router.router.stats.decisions == 20
                       and router.router.snapshot_version > 0, 30, "the loop did not run")

        own.stop()
        own.start()  # the same port, nothing on it
        started = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=30)
        detected_s = time.monotonic() - started
        for stop in stops:
            stop.set()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        own.stop()
    assert not pending, "a worker did not notice that the broker came back empty"
    for task in tasks:
        assert isinstance(task.exception(), BrokerResetError), task.exception()
    print(f"\ndetected in {detected_s:.1f} s:\n  {tasks[0].exception()}\n  {tasks[1].exception()}")
    assert router.reset is tasks[0].exception()
    assert "restarted empty" in str(router.reset)
    # The learner's model is the only copy left: it is in a file, as a valid snapshot frame.
    assert learner.saved_model is not None and learner.saved_model.exists()
    saved = decode_snapshot(learner.saved_model.read_bytes())
    assert (saved.header.n_updates, saved.header.outcomes_offset) == (20, 19)


class FakeConsumer:
    def __init__(self, highwaters):
        self.highwaters = highwaters

    def assignment(self):
        return set(self.highwaters)

    def highwater(self, tp):
        return self.highwaters[tp]


class FakeCluster:
    def __init__(self, partitions):
        self.partitions = partitions

    def partitions_for_topic(self, topic):
        return self.partitions.get(topic)


class FakeClient:
    def __init__(self, partitions):
        self.cluster = FakeCluster(partitions)

    async def fetch_all_metadata(self):
        return self.cluster


def test_a_log_shorter_than_what_was_read_is_a_reset():
    from aiokafka import TopicPartition

    from deploy.kafka import LogGuard

    tp, other = TopicPartition("x.outcomes", 0), TopicPartition("x.requests", 1)
    guard = LogGuard("learner")
    guard.read(tp, 41)
    guard.read(other, 3)
    guard.check(FakeConsumer({tp: 42, other: None}))  # at the end; not fetched yet
    guard.check(FakeConsumer({tp: 50}))                # more came; `other` not assigned here
    with pytest.raises(BrokerResetError, match=r"x.outcomes\[0\] ends at offset 0, but this worker already read up to offset 41"):
        guard.check(FakeConsumer({tp: 0}))


async def test_a_vanished_topic_or_another_partition_count_is_a_reset():
    from deploy.kafka import check_layout

    live = Settings(topic_prefix="x.", partitions=2)
    good = {"x.outcomes": {0}, "x.snapshots": {0}, "x.requests": {0, 1}}
    await check_layout(FakeClient(good), live, ("outcomes", "snapshots", "requests"), "w")
    with pytest.raises(BrokerResetError, match="topic x.snapshots has vanished"):
        await check_layout(FakeClient({**good, "x.snapshots": None}), live, ("snapshots",), "w")
    with pytest.raises(BrokerResetError, match=r"x.outcomes has 4 partition\(s\), not 1"):
        await check_layout(FakeClient({**good, "x.outcomes": {0, 1, 2, 3}}), live, ("outcomes",), "w")


@pytest.mark.integration
async def test_a_broker_that_comes_back_empty_stops_the_feedback_worker(tmp_path):
    from deploy.local import LocalLoop
    from schemas import ModelResponse, RewardEvent, RouteDecision

    own = EmbeddedBroker(_free_port(), log_path=tmp_path / "broker.log")
    own.start()
    loop = None
    try:
        live = Settings(bootstrap_servers=own.bootstrap_servers, topic_prefix="reset.", partitions=2,
                        data_dir=str(tmp_path / "data"), reward_wait_s=30.0)
        loop = LocalLoop(live, log_dir=tmp_path / "logs", start_broker=False, workers=("feedback",))
        await asyncio.to_thread(loop.start)
        live = loop.settings
        rng = np.random.default_rng(0)
        decision = RouteDecision(request_id="q", model="a", propensity=1.0, distribution={"a": 1.0},
                                 preference=Preference(quality=1, cost=0), features=rng.standard_normal(4),
                                 featuriser="f", policy="p", snapshot_version=0, cold_start=True)
        async with make_producer(live) as producer:
            for topic, event in (("decisions", decision), ("responses", ModelResponse(request_id="q", model="a",
                                 cost_usd=0.0)), ("rewards", RewardEvent(reward_id="w", request_id="q", quality=1.0))):
                await producer.send_and_wait(live.topic(topic), encode(event), key=b"q")
        from deploy.chaos import read_topic

        deadline = time.monotonic() + 40
        while not await read_topic(live, "outcomes", idle_ms=500):
            loop.check_alive()
            assert time.monotonic() < deadline, "the feedback worker joined nothing"
        await asyncio.sleep(4)  # settled: its commits went through
        own.stop()
        own.start()
        process = loop.processes["feedback"]
        deadline = time.monotonic() + 16
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        log = (tmp_path / "logs" / "feedback.log").read_text(errors="replace")
    finally:
        if loop is not None:
            await asyncio.to_thread(loop.stop)
        own.stop()
    assert process.returncode not in (None, 0), "the feedback worker did not stop"
    assert "restarted empty" in log
