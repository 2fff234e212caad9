"""The whole loop on the real broker: a RouterBench replay through every worker, with garbage.

Every worker runs as its own process (as `routeloop up` starts them); the replay plays the
application, the downstream caller and the evaluator. Malformed bytes are written to every
input topic mid-replay; each must land in the dead-letter topic while the loop goes on.
"""

import asyncio
import base64
from collections import Counter

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from deploy.cli import main
from deploy.export import export_topic
from deploy.kafka import make_producer
from deploy.local import LocalLoop
from deploy.topics import iter_topic
from deploy.replay import DEADLETTER_MAX_BYTES, Replay, ReplayOptions
from router.datasets import load_dataset
from schemas import DeadLetter, decode

pytestmark = pytest.mark.integration

N_TRAIN, N_TEST = 300, 100

#: What is written to each input topic mid-replay, and the dead-letter reason each must get.
GARBAGE = [
    ("requests", b"\xff\xfe not json", "invalid_json"),
    ("requests", orjson.dumps({"request_id": "g1", "prompt": "hi", "preference": {"quality": -1, "cost": 1}}),
     "invalid_event"),
    ("decisions", b"{\"request_id\": ", "invalid_json"),
    ("responses", orjson.dumps({"request_id": "g2", "model": "m", "cost_usd": -0.5}), "invalid_event"),
    ("rewards", orjson.dumps({"reward_id": "g3", "request_id": "g3", "quality": 1.5}), "invalid_event"),
    ("rewards", b"[]", "invalid_event"),
    ("outcomes", b"NaN", "invalid_json"),
    # Well-formed and keyed by its request id, for a request that never existed: closed as an
    # orphan after the window.
    ("rewards", orjson.dumps({"reward_id": "g4", "request_id": "never-requested", "quality": 1.0}),
     "orphan_reward"),
]
ORPHAN_KEY = b"never-requested"


def small_routerbench(data_dir):
    data = load_dataset(data_dir)
    rng = np.random.default_rng(0)
    train = rng.choice(np.flatnonzero(data.split == "train"), N_TRAIN, replace=False)
    test = rng.choice(np.flatnonzero(data.split == "test"), N_TEST, replace=False)
    return data.subset(np.concatenate([train, test]))


async def read_dead_letters(settings) -> list[DeadLetter]:
    return [decode(DeadLetter, r.value, max_bytes=DEADLETTER_MAX_BYTES)
            async for r in iter_topic(settings, "deadletter", idle_ms=2000)]


async def test_replay_through_every_worker(settings, data_dir, tmp_path):
    data = small_routerbench(data_dir)
    live = settings.model_copy(update={
        "models": data.models, "featuriser": "hashing://?dim=384", "reward_wait_s": 6.0,
        "snapshot_every_n": 50, "snapshot_every_s": 1.0,
    })
    loop = LocalLoop(live, log_dir=tmp_path / "logs", start_broker=False)
    await asyncio.to_thread(loop.start)
    try:
        replay = Replay(live, data, ReplayOptions(reward_delay_mean_s=0.3, max_in_flight=8, settle_s=30,
                                                  progress=False, router_url=loop.router_url))
        running = asyncio.create_task(replay.run())
        await asyncio.sleep(3)
        async with make_producer(live) as producer:
            for short, raw, reason in GARBAGE:
                await producer.send_and_wait(live.topic(short), raw, key=ORPHAN_KEY if reason == "orphan_reward" else b"g")
        report = await running
        await asyncio.sleep(live.reward_wait_s + 2)  # the orphan closes one window after it came
        loop.check_alive()  # nobody crashed on the garbage
        letters = await read_dead_letters(live)
    finally:
        await asyncio.to_thread(loop.stop)
    exported = await export_topic(live, "outcomes", tmp_path / "outcomes.jsonl")

    c = report["counts"]
    lost, duplicated = c["rewards_lost_simulated"], c["rewards_duplicated_simulated"]
    assert c["requests"] == c["decisions"] == c["responses"] == c["outcomes"] == N_TRAIN
    assert c["rewards"] == N_TRAIN - lost + duplicated
    assert (c["joined"], c["defaulted"]) == (N_TRAIN - lost, lost)
    assert c["duplicates"] == duplicated and c["late"] == 0
    assert report["snapshots"]["published"] >= 3
    assert report["snapshots"]["applied_by_router"] >= 3
    assert report["snapshots"]["refused_by_router"] == {}
    # The learner applied every outcome once; its offset also passed the one garbage record.
    assert report["snapshots"]["final_n_updates"] == N_TRAIN
    assert report["snapshots"]["final_outcomes_offset"] == N_TRAIN
    assert "policy" in report["heldout"]

    def origin(letter):
        raw = base64.b64decode(letter.raw_b64)
        # The sweep dead-letters the event it held, which names the request it was for.
        return any(raw == g or b"never-requested" in raw for _, g, _ in GARBAGE)

    garbage = Counter((l.source_topic.removeprefix(live.topic_prefix), l.reason) for l in letters if origin(l))
    assert garbage == Counter((short, reason) for short, _, reason in GARBAGE)
    assert all(base64.b64decode(l.raw_b64) for l in letters)  # the raw bytes are kept
    assert Counter(l.reason for l in letters)["duplicate_reward"] == duplicated

    # The logged outcomes value a policy that never ran (the numbers: tests/test_offpolicy.py).
    assert exported == N_TRAIN + 1  # and the one garbage record
    result = CliRunner().invoke(main, ["evaluate", "--outcomes", str(tmp_path / "outcomes.jsonl"),
                                       "--policy", "model:gpt-4-1106-preview"])
    assert result.exit_code == 0, result.output
    assert f"{N_TRAIN} outcomes (1 unreadable lines skipped)" in result.output
    assert {line.split()[0] for line in result.output.splitlines()[1:]} == {"ips", "snips", "dr"}
