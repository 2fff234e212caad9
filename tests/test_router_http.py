"""The routing worker's HTTP API, endpoint by endpoint, on a worker running on the real broker.

The worker runs in the test's event loop (RoutingWorker.run) on its own topics; every event the
API accepts is read back from its topic. tests/test_router_openapi.py checks the OpenAPI
document against a worker process with schemathesis.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.kafka import make_producer
from deploy.local import free_port_block
from deploy.topics import iter_topic
from router.http import create_app, openapi_document
from router.policy import make_policy
from router.snapshot import encode_snapshot
from router.worker import RoutingWorker
from schemas import ModelResponse, RewardEvent, RouteDecision, decode

pytestmark = pytest.mark.integration

MODELS = ("small", "medium", "large")
DIM = 32


@pytest.fixture
async def live(settings):
    return settings.model_copy(update={"models": MODELS, "featuriser": f"hashing://?dim={DIM}",
                                       "http_port": free_port_block(1)})


@pytest.fixture
async def worker(live):
    """A running routing worker, healthy (its group joined) before the test starts."""
    running = RoutingWorker(live)
    stop = asyncio.Event()
    task = asyncio.create_task(running.run(stop))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{live.http_port}") as http:
        deadline = time.monotonic() + 30
        while True:
            assert not task.done(), task
            try:
                async with http.get("/healthz") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "the worker did not become healthy"
            await asyncio.sleep(0.2)
    yield running
    stop.set()
    await task


@pytest.fixture
async def http(live, worker):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{live.http_port}",
                                     timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def read_topic(settings, short: str) -> dict[bytes, bytes]:
    """Key -> value of every record of a topic."""
    return {r.key: r.value async for r in iter_topic(settings, short)}


async def test_route_answers_and_produces_the_decision(live, http):
    async with http.post("/v1/route", json={"request_id": "mine-1", "prompt": "What is 2+2?",
                                            "candidates": ["small", "large"],
                                            "preference": {"quality": 3, "cost": 1}}) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["request_id"] == "mine-1" and answer["model"] in ("small", "large")
    assert set(answer["distribution"]) <= {"small", "large"}
    assert answer["propensity"] == answer["distribution"][answer["model"]]
    assert answer["preference"] == {"quality": 0.75, "cost": 0.25}
    assert (answer["snapshot_version"], answer["cold_start"]) == (0, True)
    assert "features" not in answer

    async with http.post("/v1/route", json={"prompt": "no id given"}) as response:
        generated = (await response.json())["request_id"]
    assert len(generated) == 32

    decisions = await read_topic(live, "decisions")
    decision = decode(RouteDecision, decisions[b"mine-1"])  # keyed by request_id, like a Kafka one
    assert (decision.model, decision.propensity) == (answer["model"], answer["propensity"])
    assert decision.features.shape == (DIM,)
    assert generated.encode() in decisions


async def test_route_accepts_an_embedding_of_the_featurisers_dimension(http):
    async with http.post("/v1/route", json={"embedding": [0.1] * DIM}) as response:
        assert response.status == 200
    async with http.post("/v1/route", json={"embedding": [0.1] * (DIM + 1)}) as response:
        assert (response.status, (await response.json())["error"]) == (422, "bad_dimension")


#: Bad bodies, the status and the error code each gets.
BAD_BODIES = [
    (b"", 400, "invalid_json"),
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 422, "invalid_event"),
    (b'{"prompt": "hi", "preference": {"quality": -1, "cost": 1}}', 422, "invalid_event"),
    (b'{"request_id": "x"}', 422, "invalid_event"),  # neither prompt nor embedding
    (b'{"prompt": "hi", "colour": "red"}', 422, "invalid_event"),
    # Strings are not numbers (the lax codec would take these, unnormalised).
    (b'{"prompt": "hi", "preference": {"quality": "4", "cost": "1"}}', 422, "invalid_event"),
    (b'{"prompt": "hi", "candidates": ["gpt-17"]}', 422, "unknown_model"),
    (b'{"prompt": "hi", "embedding": "not base64!"}', 422, "invalid_event"),
    (b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "too_large"),
]


async def test_route_refuses_bad_bodies_with_a_json_error(http):
    for body, status, error in BAD_BODIES:  # one worker for all: a group join costs seconds
        async with http.post("/v1/route", data=body, headers={"Content-Type": "application/json"}) as response:
            answer = await response.json()
            assert (response.status, answer["error"]) == (status, error), body[:80]
        assert answer["detail"]


async def test_rewards_and_responses_are_produced_keyed_by_request_id(live, http):
    reward = {"reward_id": "w1", "request_id": "q7", "quality": 0.9, "evaluator": "judge"}
    async with http.post("/v1/rewards", json=reward) as response:
        assert response.status == 202
        assert await response.json() == {"topic": live.topic("rewards"), "request_id": "q7"}
    async with http.post("/v1/responses", json={"request_id": "q7", "model": "small", "cost_usd": 0.002}) as response:
        assert response.status == 202
    async with http.post("/v1/rewards", json={**reward, "quality": 1.5}) as response:
        assert (response.status, (await response.json())["error"]) == (422, "invalid_event")

    rewards = await read_topic(live, "rewards")
    assert list(rewards) == [b"q7"]
    assert decode(RewardEvent, rewards[b"q7"]).quality == 0.9
    assert decode(ModelResponse, (await read_topic(live, "responses"))[b"q7"]).cost_usd == 0.002


async def get(http, path: str) -> tuple[int, dict]:
    async with http.get(path) as response:
        return response.status, await response.json()


async def until(http, path: str, accept, timeout_s: float = 15.0) -> dict:
    """GET ``path`` until ``accept(status, body)``; the body."""
    deadline = time.monotonic() + timeout_s
    while not accept(*(answer := await get(http, path))):
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.2)
    return answer[1]


async def test_model_reports_the_snapshot_in_use_and_the_refusals(live, http):
    status, cold = await get(http, "/v1/model")
    assert status == 200
    assert (cold["snapshot_version"], cold["cold_start"], cold["snapshot_age_s"]) == (0, True, None)
    assert cold["arms"] == list(MODELS) and cold["dim"] == DIM and cold["n_updates"] == 0

    policy = make_policy("decomposed-ts", arms=list(MODELS), dim=DIM, tau=0.01)
    rng = np.random.default_rng(0)
    for i in range(7):
        policy.learn(i % 3, rng.standard_normal(DIM), 0.5, 0.001)
    async with make_producer(live) as producer:
        for frame in (encode_snapshot(policy, 3, 6), b"not a snapshot", encode_snapshot(policy, 2, 5)):
            await producer.send_and_wait(live.topic("snapshots"), frame, key=b"model")
            # One at a time: of a batch the router looks at the newest frame only.
            await asyncio.sleep(1.5)

    warm = await until(http, "/v1/model", lambda _, m: m["snapshots"]["stale"] == 1)
    assert (warm["snapshot_version"], warm["cold_start"], warm["n_updates"]) == (3, False, 7)
    assert 0 <= warm["snapshot_age_s"] < 60
    assert warm["snapshots"] == {"applied": 1, "refused": 1, "stale": 1, "refusals": {"bad_frame": 1}}

    async with http.post("/v1/route", json={"prompt": "warm now"}) as response:
        assert (await response.json())["snapshot_version"] == 3


async def test_healthz_is_503_with_a_reason_while_the_broker_is_frozen(broker, http):
    status, health = await get(http, "/healthz")
    assert (status, health["assigned_partitions"]) == (200, [0, 1])
    broker.freeze()
    try:
        status, health = await get(http, "/healthz")
    finally:
        broker.thaw()
    assert status == 503 and health["status"] == "unavailable" and not health["broker_reachable"]
    assert "metadata" in health["reason"]
    await until(http, "/healthz", lambda status, _: status == 200, timeout_s=30)


async def test_metrics_count_decisions_and_http_statuses(http):
    for prompt in ("a", "b", "c"):
        async with http.post("/v1/route", json={"prompt": prompt}) as response:
            assert response.status == 200
    async with http.post("/v1/route", data=b"nope") as response:
        assert response.status == 400
    async with http.get("/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert sum(v for (name, _), v in samples.items() if name == "routeloop_decisions_total") == 3
    assert samples[("routeloop_http_responses_total", (("route", "/v1/route"), ("status", "400")))] == 1
    assert samples[("routeloop_decision_latency_seconds_count", (("source", "http"),))] == 3


async def test_unknown_paths_and_methods_get_json_errors(http):
    async with http.get("/v2/route") as response:
        assert (response.status, (await response.json())["error"]) == (404, "not_found")
    async with http.get("/v1/route") as response:
        assert (response.status, (await response.json())["error"]) == (405, "method_not_allowed")
        assert response.headers["Allow"] == "POST"


async def test_openapi_document_describes_exactly_the_handlers(http, worker):
    async with http.get("/openapi.json") as response:
        document = await response.json()
    assert document == openapi_document() and document["openapi"].startswith("3.")
    served = {(route.method, route.resource.canonical) for route in create_app(worker).router.routes()}
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented == served
    body = document["components"]["schemas"]["RouteBody"]
    assert "request_id" not in body.get("required", []) and body["additionalProperties"] is False
