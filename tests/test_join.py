"""Unit tests of the reward join (streams.join): pure logic, no broker."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from schemas.events import (
    ModelResponse,
    Outcome,
    Preference,
    RewardEvent,
    RouteDecision,
)
from streams.join import REASONS, RewardJoiner

TAU = 0.01
WAIT = 60.0


def decision(rid: str, model: str = "a", pref: tuple[float, float] = (0.8, 0.2), t: float = 100.0):
    return RouteDecision(
        request_id=rid,
        model=model,
        propensity=0.7,
        distribution={"a": 0.7, "b": 0.3},
        preference=Preference(quality=pref[0], cost=pref[1]),
        features=np.array([0.5, -1.25, 3.0, 0.0], dtype=np.float32),
        featuriser="hashing",
        policy="decomposed-ts",
        snapshot_version=7,
        cold_start=False,
        created_at=t,
    )


def response(rid: str, model: str = "a", cost: float = 0.004):
    return ModelResponse(request_id=rid, model=model, cost_usd=cost, created_at=101.0)


def reward(rid: str, wid: str = "w1", quality: float = 0.9):
    return RewardEvent(reward_id=wid, request_id=rid, quality=quality, created_at=102.0)


def joiner(state=None, **kw) -> RewardJoiner:
    kw = {"reward_wait_s": WAIT, "tau": TAU, "default_quality": 0.0, **kw}
    return RewardJoiner({} if state is None else state, **kw)


def feed(j: RewardJoiner, event, now: float, source=None):
    if isinstance(event, RouteDecision):
        return j.on_decision(event, now, source)
    if isinstance(event, ModelResponse):
        return j.on_response(event, now, source)
    return j.on_reward(event, now, source)


def comparable(outcome: Outcome) -> dict:
    return outcome.model_dump(mode="json", exclude={"created_at"})


def formula(q: float, c: float, pref: Preference) -> float:
    return pref.quality * q - pref.cost * min(c / TAU, 1.0)


def test_all_six_arrival_orders_give_the_same_outcome():
    events = [decision("q1"), response("q1"), reward("q1")]
    seen = []
    for order in itertools.permutations(events):
        j = joiner()
        outcomes = []
        for i, event in enumerate(order):
            result = feed(j, event, 10.0 + i)
            assert result.rejects == []
            outcomes += result.outcomes
        assert len(outcomes) == 1
        seen.append(comparable(outcomes[0]))
        assert j.counters.joined == 1
        # the entry is now a tombstone that remembers the applied reward
        (entry,) = j.state.values()
        assert entry["completion"] == "joined" and entry["reward_id"] == "w1"
    assert all(s == seen[0] for s in seen)
    out = Outcome.model_validate(seen[0] | {"created_at": 0.0})
    d = decision("q1")
    assert out.completion == "joined"
    assert out.quality == 0.9 and out.cost_usd == 0.004 and out.model == "a"
    assert out.propensity == d.propensity and out.distribution == d.distribution
    assert out.snapshot_version == 7 and out.decided_at == d.created_at
    assert out.preference == d.preference
    np.testing.assert_array_equal(out.features, d.features)
    assert out.reward == pytest.approx(formula(0.9, 0.004, d.preference))


def test_outcome_created_at_is_now():
    j = joiner()
    j.on_decision(decision("q1"), 1.0)
    j.on_response(response("q1"), 2.0)
    (out,) = j.on_reward(reward("q1"), 3.5).outcomes
    assert out.created_at == 3.5


@pytest.mark.parametrize(
    "pref,quality,cost",
    [
        ((1.0, 0.0), 0.6, 0.5),
        ((0.0, 1.0), 0.6, 0.005),
        ((0.5, 0.5), 1.0, 0.02),  # cost above tau: the penalty is capped at 1
        ((0.8, 0.2), 0.25, 0.0),
        ((3.0, 1.0), 0.7, 0.0075),  # normalised to (0.75, 0.25)
    ],
)
def test_reward_equals_the_barp_formula(pref, quality, cost):
    j = joiner()
    d = decision("q1", pref=pref)
    j.on_decision(d, 0.0)
    j.on_response(response("q1", cost=cost), 0.0)
    (out,) = j.on_reward(reward("q1", quality=quality), 0.0).outcomes
    w_q, w_c = pref[0] / sum(pref), pref[1] / sum(pref)
    assert out.reward == pytest.approx(w_q * quality - w_c * min(cost / TAU, 1.0), abs=1e-12)


def test_expiry_without_reward_defaults():
    j = joiner(default_quality=0.3)
    j.on_response(response("q1", cost=0.02), 0.0)  # the window starts at the first event
    j.on_decision(decision("q1"), 30.0)
    assert not j.expire(59.9)
    result = j.expire(60.0)
    assert result.rejects == []
    (out,) = result.outcomes
    assert out.completion == "defaulted" and out.quality == 0.3
    assert out.reward == pytest.approx(formula(0.3, 0.02, decision("q1").preference))
    assert j.counters.defaulted == 1
    # a reward after the close is late, and a re-sweep emits nothing more
    (rej,) = j.on_reward(reward("q1"), 61.0).rejects
    assert rej.reason == "late_reward"
    assert not j.expire(62.0)


def test_default_quality_none_drops():
    j = joiner(default_quality=None)
    j.on_decision(decision("q1"), 0.0, source=["decisions", 2, 11])
    j.on_response(response("q1"), 1.0, source=["responses", 2, 5])
    result = j.expire(WAIT)
    assert result.outcomes == []
    assert [(r.reason, type(r.event).__name__, r.source) for r in result.rejects] == [
        ("expired_no_reward", "RouteDecision", ["decisions", 2, 11]),
        ("expired_no_reward", "ModelResponse", ["responses", 2, 5]),
    ]
    assert j.counters.dropped == 1
    assert j.on_reward(reward("q1"), WAIT + 1).rejects[0].reason == "late_reward"


def test_duplicate_reward_pending_is_applied_once():
    j = joiner()
    j.on_decision(decision("q1"), 0.0)
    assert j.on_reward(reward("q1", "w1", 0.9), 1.0).rejects == []
    (rej,) = j.on_reward(reward("q1", "w1", 0.9), 2.0).rejects
    assert rej.reason == "duplicate_reward"
    # a second, different reward id while pending: the first wins, the second is a duplicate
    (rej,) = j.on_reward(reward("q1", "w2", 0.1), 3.0).rejects
    assert rej.reason == "duplicate_reward" and rej.event.reward_id == "w2"
    (out,) = j.on_response(response("q1"), 4.0).outcomes
    assert out.quality == 0.9
    assert j.counters.duplicates == 2 and j.counters.joined == 1


def test_duplicate_and_late_rewards_after_close():
    j = joiner()
    for e in (decision("q1"), response("q1"), reward("q1", "w1")):
        feed(j, e, 0.0)
    result = j.on_reward(reward("q1", "w1"), 5.0, source=["rewards", 0, 9])
    assert result.outcomes == []
    assert [(r.reason, r.source) for r in result.rejects] == [("duplicate_reward", ["rewards", 0, 9])]
    (rej,) = j.on_reward(reward("q1", "w9", 0.2), 6.0).rejects
    assert rej.reason == "late_reward" and rej.event.reward_id == "w9"
    assert j.counters.late == 1 and j.counters.duplicates == 1
    # and nothing of it reaches the sweep
    assert not j.expire(WAIT + 10)


def test_duplicate_decision_and_response():
    j = joiner()
    assert not j.on_decision(decision("q1"), 0.0)
    assert j.on_decision(decision("q1", model="b"), 1.0).rejects[0].reason == "duplicate_decision"
    assert not j.on_response(response("q1", cost=0.001), 2.0)
    assert j.on_response(response("q1", cost=0.009), 3.0).rejects[0].reason == "duplicate_response"
    (out,) = j.on_reward(reward("q1"), 4.0).outcomes
    assert out.model == "a" and out.cost_usd == 0.001  # the first wins
    # after the close, too
    assert j.on_decision(decision("q1"), 5.0).rejects[0].reason == "duplicate_decision"
    assert j.on_response(response("q1"), 5.0).rejects[0].reason == "duplicate_response"


def test_model_mismatch_either_order():
    # response first, then a decision for another model: the response is rejected
    j = joiner()
    j.on_response(response("q1", model="b"), 0.0, source="src-r")
    result = j.on_decision(decision("q1", model="a"), 1.0)
    assert [(r.reason, r.event.model, r.source) for r in result.rejects] == [("model_mismatch", "b", "src-r")]
    j.on_reward(reward("q1"), 2.0)
    (out,) = j.on_response(response("q1", model="a"), 3.0).outcomes
    assert out.model == "a"
    # decision first
    j = joiner()
    j.on_decision(decision("q2", model="a"), 0.0)
    assert j.on_response(response("q2", model="b"), 1.0).rejects[0].reason == "model_mismatch"
    j.on_reward(reward("q2"), 2.0)
    (rej,) = j.expire(WAIT).rejects[:1]
    assert rej.reason == "expired_no_response"
    assert j.counters.mismatches == 1


def test_orphans_and_missing_responses_expire():
    j = joiner()
    j.on_reward(reward("r-only"), 0.0)
    j.on_response(response("resp-only"), 1.0)
    j.on_response(response("no-decision"), 2.0)
    j.on_reward(reward("no-decision"), 2.0)
    j.on_decision(decision("d-only"), 3.0)
    j.on_decision(decision("d-and-w"), 4.0)
    j.on_reward(reward("d-and-w"), 4.0)
    assert not j.expire(WAIT - 0.5)
    result = j.expire(WAIT + 4.0)
    assert result.outcomes == []
    got = [(r.reason, r.event.request_id, type(r.event).__name__) for r in result.rejects]
    assert got == [
        ("orphan_reward", "r-only", "RewardEvent"),
        ("orphan_response", "resp-only", "ModelResponse"),
        ("orphan_response", "no-decision", "ModelResponse"),
        ("orphan_reward", "no-decision", "RewardEvent"),
        ("expired_no_response", "d-only", "RouteDecision"),
        ("expired_no_response", "d-and-w", "RouteDecision"),
        ("expired_no_response", "d-and-w", "RewardEvent"),
    ]
    assert j.counters.orphans == 4 and j.counters.expired_no_response == 2
    # events for closed entries are recognised
    assert j.on_decision(decision("r-only"), WAIT + 5).rejects[0].reason == "late_decision"
    assert j.on_response(response("d-only"), WAIT + 5).rejects[0].reason == "late_response"
    assert j.on_reward(reward("r-only", "w1"), WAIT + 5).rejects[0].reason == "duplicate_reward"
    assert j.on_reward(reward("d-only", "w1"), WAIT + 5).rejects[0].reason == "late_reward"
    assert set(j.counters.rejects) <= set(REASONS)


def test_tombstones_expire_and_state_is_bounded():
    ttl = 3 * WAIT
    j = joiner(tombstone_ttl=ttl)
    rng = random.Random(7)
    peak = 0
    now = 0.0
    # 1 request a second for 2,000 s; a tenth never gets a reward, a tenth only a reward
    for i in range(2000):
        now = float(i)
        kind = rng.random()
        rid = f"q{i}"
        if kind < 0.1:
            j.on_reward(reward(rid), now)
        else:
            j.on_decision(decision(rid), now)
            j.on_response(response(rid), now)
            if kind > 0.2:
                j.on_reward(reward(rid), now + 0.5)
        if i % 10 == 0:
            j.expire(now)
        peak = max(peak, len(j.state))
    # entries live at most WAIT (+ one sweep period) and tombstones ttl more
    assert peak <= WAIT + ttl + 20
    assert j.pending() > 0
    j.expire(now + WAIT)
    assert j.pending() == 0
    j.expire(now + WAIT + ttl)
    assert len(j.state) == 0
    c = j.counters
    assert c.joined + c.defaulted + c.orphans == 2000
    assert c.tombstones_removed == 2000


def test_tombstone_ttl_defaults_to_ten_windows():
    j = joiner()
    assert j.tombstone_ttl == 10 * WAIT
    j.on_reward(reward("q1"), 0.0)
    j.expire(WAIT)
    j.expire(WAIT + 10 * WAIT - 1)
    assert len(j.state) == 1
    j.expire(WAIT + 10 * WAIT)
    assert len(j.state) == 0


def test_state_is_json_and_survives_a_round_trip():
    """Entries are plain JSON dicts: a joiner on a restored copy carries on (changelog recovery)."""
    j = joiner()
    j.on_decision(decision("q1"), 0.0, source=["t", 0, 1])
    j.on_reward(reward("q1"), 1.0)
    j.on_response(response("q2"), 1.0)
    j.on_decision(decision("q3"), 1.0)
    j.on_response(response("q3"), 1.0)
    j.on_reward(reward("q3"), 1.0)
    restored = json.loads(json.dumps(j.state))
    assert restored == j.state
    k = joiner(restored)
    (out,) = k.on_response(response("q1"), 2.0).outcomes
    (again,) = j.on_response(response("q1"), 2.0).outcomes
    assert out.model_dump(mode="json") == again.model_dump(mode="json")
    assert k.on_reward(reward("q3"), 3.0).rejects[0].reason == "duplicate_reward"
    assert [r.reason for r in k.expire(WAIT + 1).rejects] == ["orphan_response"]


def test_deterministic_given_now():
    rng = random.Random(3)
    events = []
    for i in range(60):
        rid = f"q{i % 40}"
        events += [decision(rid), response(rid, cost=0.001 * (i % 7))]
        if i % 3:
            events.append(reward(rid, f"w{i % 5}", quality=(i % 10) / 10))
    rng.shuffle(events)

    def run():
        j = joiner()
        log = []
        for t, e in enumerate(events):
            r = feed(j, e, float(t))
            log += [comparable(o) for o in r.outcomes] + [(x.reason, x.event.model_dump(mode="json")) for x in r.rejects]
            if t % 17 == 0:
                r = j.expire(float(t))
                log += [comparable(o) for o in r.outcomes] + [x.reason for x in r.rejects]
        return log, j.counters.as_dict()

    assert run() == run()


def test_invalid_configuration():
    with pytest.raises(ValueError):
        joiner(reward_wait_s=0)
    with pytest.raises(ValueError):
        joiner(default_quality=1.5)


def test_from_settings():
    from schemas.settings import Settings

    s = Settings.load(env={}, reward_wait_s=5.0, tau=0.02, default_quality=0.25)
    j = RewardJoiner.from_settings({}, s)
    assert (j.reward_wait_s, j.tau, j.default_quality, j.tombstone_ttl) == (5.0, 0.02, 0.25, 50.0)
