"""Prometheus metrics: the names each worker kind exposes, what the router and learner count.

The learner test runs a real LearnerWorker on the embedded broker and scrapes the
``/metrics`` it serves on ``http_port + 1``.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka import make_producer
from deploy.local import free_port_block
from router.featurise import featuriser_from_url
from router.metrics import FeedbackMetrics, LearnerMetrics, RouterMetrics, metrics_port
from router.policy import make_policy
from router.snapshot import encode_snapshot
from router.worker import Router
from schemas import Outcome, Preference, RouteRequest, encode
from schemas.settings import Settings
from streams.learner import LearnerWorker

ARMS = ["strong", "cheap", "other"]


def names(registry) -> set[str]:
    return {family.name for family in text_string_to_metric_families(generate_latest(registry).decode())}


def test_each_worker_kind_exposes_its_metrics_with_help_texts():
    expected = {
        RouterMetrics: {"routeloop_decisions", "routeloop_exploration_decisions", "routeloop_deadletters",
                        "routeloop_snapshot_version", "routeloop_snapshot_age_seconds",
                        "routeloop_snapshots_applied", "routeloop_snapshots_stale",
                        "routeloop_snapshots_refused", "routeloop_decision_latency_seconds",
                        "routeloop_http_responses", "routeloop_model_enabled", "routeloop_model_price",
                        "routeloop_registry_records_refused"},
        LearnerMetrics: {"routeloop_learner_updates", "routeloop_learner_duplicate_outcomes",
                         "routeloop_learner_lag_outcomes", "routeloop_learner_outcomes_offset",
                         "routeloop_learner_snapshots_published", "routeloop_learner_snapshot_version",
                         "routeloop_deadletters"},
        FeedbackMetrics: {"routeloop_outcomes", "routeloop_late_rewards", "routeloop_deadletters"},
    }
    for kind, wanted in expected.items():
        registry = kind().registry
        # (The text format shows an unlabelled counter's creation time as a family of its own.)
        exposed = {n for n in names(registry) if n.startswith("routeloop_") and not n.endswith("_created")}
        assert exposed == wanted, kind.__name__
        assert "process_cpu_seconds" in names(registry)  # the process collectors come along
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            assert len(family.documentation) > 20, family.name


def test_metrics_ports_follow_http_port():
    settings = Settings(http_port=9000)
    assert [metrics_port(settings, k) for k in ("router", "learner", "feedback")] == [9000, 9001, 9002]
    assert metrics_port(Settings(http_port=0), "learner") is None


def confident_policy(dim: int):
    """A policy sure that 'strong' is best: quality 1 at no cost, the others quality 0."""
    rng = np.random.default_rng(0)
    policy = make_policy("decomposed-ts", arms=ARMS, dim=dim, tau=0.01)
    for _ in range(300):
        x = rng.standard_normal(dim)
        x /= np.linalg.norm(x)
        for arm in range(len(ARMS)):
            policy.learn(arm, x, 1.0 if arm == 0 else 0.0, 0.0)
    return policy


def test_router_counts_decisions_explorations_and_snapshots():
    featuriser = featuriser_from_url("hashing://?dim=32")
    router = Router(Settings(models=tuple(ARMS)), featuriser, seed=1)
    registry = router.metrics.registry
    assert np.isnan(registry.get_sample_value("routeloop_snapshot_age_seconds"))

    assert router.apply_snapshot(encode_snapshot(confident_policy(32), 5, 899))
    assert not router.apply_snapshot(encode_snapshot(confident_policy(32), 4, 10))  # stale
    assert not router.apply_snapshot(b"garbage")
    assert registry.get_sample_value("routeloop_snapshot_version") == 5
    assert 0 <= registry.get_sample_value("routeloop_snapshot_age_seconds") < 60
    assert registry.get_sample_value("routeloop_snapshots_applied_total") == 1
    assert registry.get_sample_value("routeloop_snapshots_stale_total") == 1
    assert registry.get_sample_value("routeloop_snapshots_refused_total", {"reason": "bad_frame"}) == 1

    requests = [RouteRequest(request_id=f"q{i}", prompt=f"prompt number {i}",
                             preference=Preference(quality=1, cost=0)) for i in range(400)]
    decisions = router.route(requests)
    by_model = {m: sum(d.model == m for d in decisions) for m in ARMS}
    for model, count in by_model.items():
        assert (registry.get_sample_value("routeloop_decisions_total", {"model": model}) or 0) == count
    # 'strong' is the greedy choice for every prompt: any other draw is exploration (the 2%
    # uniform mixing, so a few in 400).
    explorations = registry.get_sample_value("routeloop_exploration_decisions_total")
    assert explorations == by_model["cheap"] + by_model["other"]
    assert 0 < explorations < 40


def outcome(i: int, dim: int = 16) -> Outcome:
    x = np.zeros(dim, dtype=np.float32)
    x[i % dim] = 1.0
    return Outcome(request_id=f"r{i}", model=ARMS[i % 3], features=x, preference=Preference(quality=1, cost=0),
                   propensity=0.5, distribution={ARMS[i % 3]: 0.5}, quality=0.5, cost_usd=0.001, reward=0.4,
                   completion="joined", snapshot_version=0, decided_at=0.0)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name + str(sorted(s.labels.items())) if s.labels else s.name): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.integration
async def test_learner_serves_its_metrics_on_http_port_plus_one(settings):
    port = free_port_block(2)
    live = settings.model_copy(update={"models": tuple(ARMS), "http_port": port,
                                       "snapshot_every_n": 5, "snapshot_every_s": 0.5})
    n = 12
    async with make_producer(live) as producer:
        for i in range(n):
            await producer.send(live.topic("outcomes"), encode(outcome(i)), key=f"r{i}".encode())
        await producer.send(live.topic("outcomes"), encode(outcome(3)), key=b"r3")  # a re-emitted outcome
        await producer.send_and_wait(live.topic("outcomes"), b"{not json", key=b"g")
    stop = asyncio.Event()
    worker = LearnerWorker(live)
    running = asyncio.create_task(worker.run(stop))
    try:
        deadline = time.monotonic() + 30
        while True:
            await asyncio.sleep(0.5)
            assert not running.done(), running
            try:
                values = await asyncio.to_thread(scrape, port + 1)
            except OSError:
                continue
            # 12 outcomes at 5 a snapshot: two by count, the third by time.
            if values.get("routeloop_learner_snapshots_published_total") == 3:
                break
            assert time.monotonic() < deadline, values
    finally:
        stop.set()
        await running
    assert values["routeloop_learner_updates_total"] == n
    assert values["routeloop_learner_duplicate_outcomes_total"] == 1
    assert values["routeloop_deadletters_total[('reason', 'invalid_json'), ('worker', 'learner')]"] == 1
    assert values["routeloop_learner_outcomes_offset"] == n + 1
    assert values["routeloop_learner_snapshot_version"] == worker.learner.version == 3
    assert values["routeloop_learner_lag_outcomes"] == 0
