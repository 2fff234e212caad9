"""The event contracts refuse what would poison a model, and say why."""

import base64
import math

import numpy as np
import orjson
import pytest

from schemas import (
    TOPIC_EVENTS,
    DecodeError,
    ModelResponse,
    Preference,
    RewardEvent,
    RouteDecision,
    RouteRequest,
    decode,
    encode,
)
from schemas.export import export_json_schemas


def reward_bytes(**fields) -> bytes:
    return orjson.dumps({"reward_id": "r1", "request_id": "q1", "quality": 1.0, **fields})


def test_reward_round_trip():
    event = RewardEvent(reward_id="r1", request_id="q1", quality=0.25, created_at=1.0)
    assert decode(RewardEvent, encode(event)) == event


@pytest.mark.parametrize("raw, reason, where", [
    (b"not json", "invalid_json", ""),
    (b"[1, 2]", "invalid_event", "JSON object"),
    (b'{"reward_id": "r", "request_id": "q", "quality": NaN}', "invalid_json", ""),
    (b'{"reward_id": "r", "request_id": "q", "quality": 1e999}', "invalid_json", ""),
    (reward_bytes(quality=1.5), "invalid_event", "quality"),
    (reward_bytes(quality=-0.1), "invalid_event", "quality"),
    (reward_bytes(quality="high"), "invalid_event", "quality"),
    (reward_bytes(request_id="x" * 129), "invalid_event", "request_id"),
    (reward_bytes(surprise=1), "invalid_event", "surprise"),
    (orjson.dumps({"reward_id": "r1", "quality": 1.0}), "invalid_event", "request_id"),
])
def test_bad_rewards_are_refused_with_a_reason(raw, reason, where):
    with pytest.raises(DecodeError) as info:
        decode(RewardEvent, raw)
    assert info.value.reason == reason
    assert where in info.value.detail


def test_oversized_message_is_refused_before_parsing():
    with pytest.raises(DecodeError) as info:
        decode(RewardEvent, b"{" + b" " * 2_000_000 + b"}")
    assert info.value.reason == "too_large"


def test_negative_and_non_finite_cost_refused():
    for cost in (-0.001, math.inf, math.nan):
        with pytest.raises(ValueError):
            ModelResponse(request_id="q", model="m", cost_usd=cost)


def test_preference_is_normalised_onto_the_simplex():
    assert Preference(quality=3, cost=1) == Preference(quality=0.75, cost=0.25)
    assert Preference.parse("quality=0.8,cost=0.2") == Preference(quality=0.8, cost=0.2)
    assert Preference.parse("quality=1") == Preference(quality=1.0, cost=0.0)


@pytest.mark.parametrize("q, c", [(-1, 2), (0, 0), (math.nan, 1), (math.inf, 1)])
def test_bad_preferences_refused(q, c):
    with pytest.raises(ValueError):
        Preference(quality=q, cost=c)


def test_request_needs_prompt_or_embedding_and_bounds_the_prompt():
    with pytest.raises(ValueError, match="prompt or an embedding"):
        RouteRequest(request_id="q")
    with pytest.raises(ValueError):
        RouteRequest(request_id="q", prompt="x" * 70_000)
    assert RouteRequest(request_id="q", embedding=[0.5, 0.5]).embedding.dtype == np.float32


def test_vectors_travel_as_base64_float32_and_refuse_nan():
    x = np.linspace(-1, 1, 384).astype(np.float32)
    decision = RouteDecision(
        request_id="q", model="m", propensity=0.5, distribution={"m": 0.5, "n": 0.5},
        preference=Preference(quality=1, cost=0), features=x, featuriser="f", policy="p",
        snapshot_version=0, cold_start=True)
    raw = encode(decision)
    assert len(raw) < 2_500  # a JSON list of 384 floats would be about 4 KB
    assert np.array_equal(decode(RouteDecision, raw).features, x)
    nan_b64 = base64.b64encode(np.array([1.0, np.nan], dtype="<f4").tobytes()).decode()
    with pytest.raises(DecodeError, match="NaN"):
        decode(RouteRequest, orjson.dumps({"request_id": "q", "embedding": nan_b64}))
    with pytest.raises(ValueError, match="NaN or infinity"):
        RouteRequest(request_id="q", embedding=np.array([1.0, np.inf]))


def test_json_schemas_exported_per_topic(tmp_path):
    paths = export_json_schemas(tmp_path)
    assert {p.name.split(".")[0] for p in paths} == set(TOPIC_EVENTS)
    reward_schema = orjson.loads((tmp_path / "rewards.schema.json").read_bytes())
    assert reward_schema["properties"]["quality"]["maximum"] == 1.0


def test_strings_for_numbers_are_refused_and_huge_weights_still_normalise():
    with pytest.raises(DecodeError, match="quality"):
        decode(RewardEvent, reward_bytes(quality="0.5"))
    with pytest.raises(ValueError):
        Preference.model_validate({"quality": "4", "cost": "1"})
    assert Preference(quality=1e308, cost=1e308) == Preference(quality=0.5, cost=0.5)
