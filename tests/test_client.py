"""The Python SDK and ``routeloop route`` against the real loop.

One LocalLoop (router, feedback worker and learner processes) runs on the session broker with
topics of its own for the whole module: starting it costs a few group joins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from uuid import uuid4

import orjson
import pytest
from click.testing import CliRunner

from deploy.cli import main
from deploy.kafka import make_consumer
from deploy.local import LocalLoop
from deploy.topics import delete_topics
from router.client import AsyncRouteloopClient, RouteloopClient, RouteTimeout
from schemas import Outcome, Preference, RouteDecision, decode
from schemas.settings import Settings

pytestmark = pytest.mark.integration

MODELS = ("small", "medium", "large")


@pytest.fixture(scope="module")
def loop(broker, tmp_path_factory) -> Iterator[LocalLoop]:
    settings = Settings(
        bootstrap_servers=broker.bootstrap_servers, topic_prefix=f"t{uuid4().hex[:8]}.", partitions=2,
        models=MODELS, featuriser="hashing://?dim=64", reward_wait_s=5.0,
        snapshot_every_n=10, snapshot_every_s=1.0)
    running = LocalLoop(settings, log_dir=tmp_path_factory.mktemp("client-logs"), start_broker=False)
    try:
        running.start()
        yield running
        running.check_alive()
    finally:
        running.stop()
        asyncio.run(delete_topics(running.settings, all_with_prefix=True))


async def read_outcomes(settings: Settings, request_ids: set[str], timeout_s: float) -> dict[str, Outcome]:
    consumer = make_consumer(settings, settings.topic("outcomes"), group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[str, Outcome] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while set(found) != request_ids and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    outcome = decode(Outcome, record.value)
                    if outcome.request_id in request_ids:
                        found[outcome.request_id] = outcome
    finally:
        await consumer.stop()
    return found


async def test_routes_20_prompts_and_the_reports_close_the_loop(loop):
    prompts = [f"question {i}: what is {i} times {i}?" for i in range(20)]
    async with AsyncRouteloopClient(loop.settings) as client:
        decisions = await asyncio.gather(*(
            client.route(prompt, preference={"quality": 0.9, "cost": 0.1},
                         candidates=["small", "large"] if i % 2 else None, timeout=60)
            for i, prompt in enumerate(prompts)))
        assert len({d.request_id for d in decisions}) == 20
        for i, decision in enumerate(decisions):
            assert isinstance(decision, RouteDecision)
            assert decision.preference == Preference(quality=0.9, cost=0.1)
            assert decision.model in (("small", "large") if i % 2 else MODELS)
        for decision in decisions:
            await client.report_response(decision.request_id, decision.model, cost_usd=0.001, latency_ms=120)
            await client.report_reward(decision.request_id, quality=0.75, evaluator="test")
    outcomes = await read_outcomes(loop.settings, {d.request_id for d in decisions}, timeout_s=60)
    assert len(outcomes) == 20
    assert all(o.completion == "joined" and o.quality == 0.75 for o in outcomes.values())


async def test_decisions_iterates_in_a_consumer_group(loop):
    async with AsyncRouteloopClient(loop.settings) as client:
        routed = {(await client.route(f"prompt {i}", timeout=60)).request_id for i in range(5)}
        seen: set[str] = set()
        async with asyncio.timeout(60):
            async for decision in client.decisions(group_id=f"downstream-{uuid4().hex[:6]}", from_beginning=True):
                seen.add(decision.request_id)
                if routed <= seen:
                    break
    assert routed <= seen


def test_the_sync_client_and_the_route_command(loop):
    with RouteloopClient(loop.settings) as client:
        decision = client.route("What is the capital of France?", candidates=["medium"], timeout=60)
        assert decision.model == "medium" and decision.propensity == 1.0
        client.report_response(decision.request_id, decision.model, cost_usd=0.0)

    runner = CliRunner()
    env = loop.settings.to_env()
    result = runner.invoke(main, ["route", "Name a prime.", "--candidates", "small,large",
                                  "--preference", "quality=1,cost=1"], env=env)
    assert result.exit_code == 0, result.output
    printed = orjson.loads(result.stdout)
    assert printed["model"] in ("small", "large") and printed["preference"] == {"quality": 0.5, "cost": 0.5}
    assert "features" not in printed

    refused = runner.invoke(main, ["route", "hi", "--preference", "speed=1"], env=env)
    assert refused.exit_code == 2 and "--preference" in refused.output


async def test_route_times_out_clearly_without_a_router(settings):
    async with AsyncRouteloopClient(settings) as client:
        started = time.monotonic()
        with pytest.raises(RouteTimeout, match="no decision for request 'lonely'") as caught:
            await client.route("anyone there?", request_id="lonely", timeout=1.0)
    assert isinstance(caught.value, TimeoutError) and caught.value.request_id == "lonely"
    assert time.monotonic() - started < 5
