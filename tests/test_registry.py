"""The model registry at run time: add, remove and reprice models without a restart.

Unit tests on ModelRegistry, the policy's repricing and the Router; then, on the embedded
broker, the ``routeloop models`` commands against a running routing worker (HTTP) and a
learner (which dead-letters bad registry records and learns only registered models).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from deploy.cli import main
from deploy.kafka import make_producer
from deploy.local import free_port_block
from deploy.topics import iter_topic
from router.featurise import featuriser_from_url
from router.policy import make_policy
from router.registry import ModelRegistry
from router.snapshot import decode_snapshot, encode_snapshot
from router.worker import Router, RoutingWorker
from schemas import DeadLetter, DecodeError, ModelSpec, Outcome, Preference, RouteRequest, decode, encode
from schemas.settings import Settings
from streams.learner import Learner, LearnerWorker

MODELS = ("small", "medium", "large")
DIM = 32
CHEAP = Preference(quality=0.3, cost=0.7)


def hashing():
    return featuriser_from_url(f"hashing://?dim={DIM}")


def requests(n: int, **kw) -> list[RouteRequest]:
    return [RouteRequest(request_id=f"q{i}", prompt=f"a prompt about topic {i}", **kw) for i in range(n)]


def learned_policy(featuriser, prompts: list[str]):
    """pooled-ucb that has seen each model 300 times: large is best and dearest, small cheapest."""
    policy = make_policy("pooled-ucb", arms=list(MODELS), dim=DIM, tau=0.01)
    X = featuriser.encode(prompts)
    for x in np.tile(X, (300 // len(X) + 1, 1))[:300]:
        for arm, (quality, cost) in enumerate([(0.5, 0.0002), (0.6, 0.001), (0.7, 0.002)]):
            policy.learn(arm, x, quality, cost)
    return policy


# -- the registry and the policy ---------------------------------------------------------------

def test_registry_newest_record_wins_and_removed_models_stay_known():
    registry = ModelRegistry(MODELS)
    assert registry.enabled == list(MODELS)
    assert registry.apply(ModelSpec(model="xl", price=5.0))
    assert not registry.apply(ModelSpec(model="xl", price=5.0))  # nothing changes
    assert registry.apply(ModelSpec(model="small", enabled=False))
    assert registry.enabled == ["medium", "large", "xl"]
    assert registry.known("small") and not registry.known("zz")
    assert registry.price("xl") == 5.0 and registry.price("medium") is None
    assert registry.mask(["small", "xl", "zz"]).tolist() == [False, True, False]


def test_configure_changes_a_clone_and_leaves_the_policy_in_use_alone():
    policy = make_policy("pooled-ucb", arms=list(MODELS), dim=DIM, tau=0.01)
    registry = ModelRegistry(MODELS)
    assert registry.configure(policy) is policy  # nothing to change: no copy
    registry.apply(ModelSpec(model="xl", price=2.0))
    configured = registry.configure(policy)
    assert configured is not policy and policy.arms == list(MODELS)
    assert configured.arms == [*MODELS, "xl"] and configured.prices.tolist() == [0, 0, 0, 2.0]


def test_a_price_change_rescales_the_learned_cost_exactly():
    rng = np.random.default_rng(0)
    repriced = make_policy("pooled-ucb", arms=["a", "b"], dim=8, tau=0.01)
    reference = make_policy("pooled-ucb", arms=["a", "b"], dim=8, tau=0.01)
    repriced.set_price(0, 2.0)  # the first price: recorded, nothing to rescale
    for _ in range(50):
        x, cost = rng.standard_normal(8), rng.uniform(0, 0.002)
        repriced.learn(0, x, 0.5, cost)
        reference.learn(0, x, 0.5, cost * 5)  # the same traffic at 5x the price
        repriced.learn(1, x, 0.4, cost)
        reference.learn(1, x, 0.4, cost)
    repriced.set_price(0, 10.0)
    np.testing.assert_allclose(repriced.estimates()[1], reference.estimates()[1], rtol=1e-12, atol=1e-18)
    np.testing.assert_array_equal(repriced.estimates()[0], reference.estimates()[0])  # quality untouched
    with pytest.raises(ValueError, match="positive"):
        repriced.set_price(0, 0.0)


def test_snapshots_carry_prices_and_older_frames_without_them_still_load():
    policy = make_policy("pooled-ucb", arms=list(MODELS), dim=DIM, tau=0.01)
    policy.set_price(2, 30.0)
    assert decode_snapshot(encode_snapshot(policy, 1, 0)).policy().prices.tolist() == [0, 0, 30.0]
    arrays = {k: v for k, v in policy.arrays().items() if k != "prices"}
    old = type(policy).from_state(policy.arms, DIM, policy.params(), arrays, 0)
    assert old.prices.tolist() == [0, 0, 0]


# -- the router ----------------------------------------------------------------------------

def test_router_explores_an_added_model_and_never_routes_to_a_removed_one():
    featuriser = hashing()
    router = Router(Settings(models=MODELS, featuriser=f"hashing://?dim={DIM}"), featuriser, seed=0)
    batch = requests(300)
    assert router.apply_snapshot(encode_snapshot(learned_policy(featuriser, [r.prompt for r in batch]), 1, 899))
    assert "xl" not in Counter(d.model for d in router.route(batch))

    assert router.apply_specs([ModelSpec(model="xl", price=4.0)])
    decisions = router.route(batch)
    # From its prior, xl has the widest bound: the optimistic policy tries it first.
    assert Counter(d.model for d in decisions)["xl"] > 150
    assert {d.price for d in decisions if d.model == "xl"} == {4.0}
    assert {d.price for d in decisions if d.model != "xl"} == {None}
    gauges = router.metrics.registry
    assert gauges.get_sample_value("routeloop_model_enabled", {"model": "xl"}) == 1
    assert gauges.get_sample_value("routeloop_model_price", {"model": "xl"}) == 4.0
    assert (gauges.get_sample_value("routeloop_decisions_total", {"model": "xl"})
            == Counter(d.model for d in decisions)["xl"])

    router.apply_specs([ModelSpec(model="xl", enabled=False), ModelSpec(model="small", enabled=False)])
    assert set(Counter(d.model for d in router.route(batch))) <= {"medium", "large"}
    assert gauges.get_sample_value("routeloop_model_enabled", {"model": "small"}) == 0
    with pytest.raises(DecodeError) as refused:
        router.check(RouteRequest(request_id="r", prompt="p", candidates=["small"]))
    assert refused.value.reason == "unknown_model"

    # A newer snapshot that has never heard of xl keeps the registry's view.
    router.apply_specs([ModelSpec(model="xl", price=4.0)])
    assert router.apply_snapshot(encode_snapshot(learned_policy(featuriser, ["other"]), 2, 1799))
    assert router.model.policy.arms == [*MODELS, "xl"] and router.model.enabled.tolist() == [False, True, True, True]


def test_router_moves_traffic_off_a_model_whose_price_rises():
    featuriser = hashing()
    router = Router(Settings(models=MODELS, featuriser=f"hashing://?dim={DIM}"), featuriser, seed=0)
    batch = requests(300, preference=CHEAP)
    assert router.apply_snapshot(encode_snapshot(learned_policy(featuriser, [r.prompt for r in batch]), 1, 899))
    X = router._features(batch)
    assert (router.model.policy.greedy(X, CHEAP.quality) == 0).all()  # small: cheap enough
    router.apply_specs([ModelSpec(model="small", price=1.0)])
    assert (router.model.policy.greedy(X, CHEAP.quality) == 0).all()  # a first price changes nothing
    router.apply_specs([ModelSpec(model="small", price=20.0)])  # $0.0002 -> $0.004 a request
    assert (router.model.policy.greedy(X, CHEAP.quality) != 0).all()
    assert Counter(d.model for d in router.route(batch))["small"] < 30  # epsilon only


# -- the learner -----------------------------------------------------------------------------

def outcome(i: int, model: str, price: float | None = None) -> Outcome:
    x = np.zeros(DIM, dtype=np.float32)
    x[i % DIM] = 1.0
    return Outcome(request_id=f"r{i}", model=model, features=x, preference=CHEAP, propensity=0.5,
                   distribution={model: 0.5}, quality=0.5, cost_usd=0.001, reward=0.1, completion="joined",
                   snapshot_version=0, price=price, decided_at=0.0)


def test_learner_learns_registered_models_at_their_decisions_price():
    settings = Settings(models=MODELS)
    learner = Learner(settings)
    with pytest.raises(DecodeError) as refused:
        learner.apply(outcome(0, "xl"), 0)
    assert refused.value.reason == "unknown_model"
    learner.registry.apply(ModelSpec(model="xl"))
    assert learner.apply(outcome(1, "xl", price=2.0), 1)
    assert learner.apply(outcome(2, "xl", price=4.0), 2)  # the decision saw a new price
    arm = learner.policy.arms.index("xl")
    assert learner.policy.prices[arm] == 4.0
    # Both costs are now at price 4: the first one doubled.
    z1, z2 = learner.policy.features(outcome(1, "xl").features[None])[0], \
        learner.policy.features(outcome(2, "xl").features[None])[0]
    np.testing.assert_allclose(learner.policy.b_cost[arm], 0.002 * z1 + 0.001 * z2)


# -- on the broker -----------------------------------------------------------------------------

async def cli(settings: Settings, *args: str):
    """Run ``routeloop ARGS`` as a user would (in a thread: it runs its own event loop)."""
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args), env=settings.to_env())
    assert result.exit_code == 0, result.output
    return result


async def until(check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not (value := await check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)
    return value


@pytest.mark.integration
async def test_models_commands_change_a_running_router_without_a_restart(settings):
    live = settings.model_copy(update={"models": MODELS, "featuriser": f"hashing://?dim={DIM}",
                                       "http_port": free_port_block(1)})
    worker = RoutingWorker(live)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{live.http_port}",
                                         timeout=aiohttp.ClientTimeout(total=20)) as http:
            async def model_info():
                try:
                    async with http.get("/v1/model") as response:
                        return await response.json() if response.status == 200 else None
                except aiohttp.ClientConnectionError:
                    return None

            async def route(**body):
                async with http.post("/v1/route", json={"prompt": "hello", **body}) as response:
                    return response.status, await response.json()

            assert (await until(model_info))["enabled"] == list(MODELS)
            assert orjson.loads((await cli(live, "models", "set", "xl", "--price", "5")).stdout) == {
                "model": "xl", "enabled": True, "price": 5.0, "created_at": pytest.approx(time.time(), abs=60)}
            info = await until(lambda: _when(model_info(), lambda m: "xl" in m["enabled"]))
            assert info["prices"] == {"xl": 5.0} and info["arms"] == [*MODELS, "xl"]
            status, answer = await route(candidates=["xl"])
            assert (status, answer["model"], answer["price"]) == (200, "xl", 5.0)

            await cli(live, "models", "remove", "small")
            await until(lambda: _when(model_info(), lambda m: "small" not in m["enabled"]))
            assert {(await route())[1]["model"] for _ in range(30)} <= {"medium", "large", "xl"}
            status, answer = await route(candidates=["small"])
            assert (status, answer["error"]) == (422, "unknown_model")

            # A record that is not a ModelSpec is counted and skipped; routing goes on.
            async with make_producer(live) as producer:
                await producer.send_and_wait(live.topic("models"), b'{"model": 3}', key=b"bad")
            await until(lambda: _ready(worker.router.stats.specs_refused == 1))
            assert (await route())[0] == 200

            listed = await cli(live, "models", "list")
            assert listed.stdout.splitlines() == ["small\tremoved\tprice -", "medium\tenabled\tprice -",
                                                  "large\tenabled\tprice -", "xl\tenabled\tprice 5"]
            assert listed.stderr == "record at offset 2 refused: invalid_event: model: Input should be a valid string\n"
            async with http.get("/metrics") as response:
                text = await response.text()
            assert 'routeloop_model_enabled{model="small"} 0.0' in text
            assert 'routeloop_decisions_total{model="xl"}' in text
    finally:
        stop.set()
        await task
    result = await asyncio.to_thread(CliRunner().invoke, main, ["models", "remove", "zz"], env=live.to_env())
    assert result.exit_code == 1 and "not in the registry" in result.output


async def _when(awaitable, accept):
    value = await awaitable
    return value if value is not None and accept(value) else None


async def _ready(flag: bool) -> bool:
    return flag


@pytest.mark.integration
async def test_learner_follows_the_registry_and_dead_letters_bad_records(settings):
    live = settings.model_copy(update={"models": MODELS, "snapshot_every_n": 3, "snapshot_every_s": 0.5})
    async with make_producer(live) as producer:
        await producer.send(live.topic("models"), encode(ModelSpec(model="xl", price=2.0)), key=b"xl")
        await producer.send(live.topic("models"), b"not json", key=b"bad")
        for i, (model, price) in enumerate([("small", None), ("xl", 2.0), ("zz", None)]):
            await producer.send(live.topic("outcomes"), encode(outcome(i, model, price)), key=f"r{i}".encode())
        await producer.flush()
    worker = LearnerWorker(live)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await until(lambda: _ready(worker.published >= 1 and worker.learner.offset == 2))
    finally:
        stop.set()
        await task
    policy = worker.learner.policy
    assert policy.arms == [*MODELS, "xl"] and policy.n_updates == 2
    assert policy.prices[policy.arms.index("xl")] == 2.0
    letters = [decode(DeadLetter, r.value) async for r in iter_topic(live, "deadletter")]
    assert sorted((d.source_topic, d.reason) for d in letters) == [
        (live.topic("models"), "invalid_json"), (live.topic("outcomes"), "unknown_model")]


def test_an_unreachable_broker_is_one_clear_error():
    result = CliRunner().invoke(main, ["models", "list"],
                                env=Settings(bootstrap_servers="127.0.0.1:9").to_env())
    assert result.exit_code == 1
    assert "cannot reach the broker at 127.0.0.1:9" in result.output
    assert "Traceback" not in result.output
