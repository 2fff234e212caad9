"""The routing worker's fast paths give exactly what the straightforward ones give.

No timing here: only that each faster path computes the same thing: the hashing featuriser
as its definition does, decisions built without pydantic's validation and encoded without its
serialiser as the validated ones (and refused where validation would refuse them).
"""

from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest

import router.worker as worker_module
from router.featurise import HashingFeaturiser, featuriser_from_url
from router.featurise.hashing import _words
from router.policy.base import Choice
from router.worker import Router, encode_decision
from schemas import ModelSpec, Preference, RouteDecision, RouteRequest, decode, encode
from schemas.events import MAX_NAME
from schemas.settings import Settings

_MASK = (1 << 64) - 1


def reference_hashing(prompt: str, dim: int) -> np.ndarray:
    """The hashing featuriser by its definition, one word at a time in plain Python."""
    words = re.findall(r"\w+", prompt.lower())
    hashes = [int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
              for w in words]
    for first, second in zip(hashes, hashes[1:]):
        x = (first * 0x9E3779B97F4A7C15 + second) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        hashes.append(x ^ (x >> 31))
    counts = np.zeros(dim)
    for h in hashes:  # unigrams, then bigrams
        counts[h % dim] += -1.0 if h >> 63 else 1.0
    row = counts.astype(np.float32)[None, :]
    row /= np.maximum(np.linalg.norm(row, axis=1, keepdims=True), 1e-12)
    return row[0]


def fuzz_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("aZ_9 \t\n.,!?-'\"ABCxyz0123456789"
                "éßİKΣσςǅ中文\u00a0\u2028\x1c\x1f\x0b\x85")  # Kelvin sign, Unicode spaces, ...
    prompts = ["", "!?", "K", "İstanbul", "ǅemal", "a_b c__d", "\x1cA\x1fB", "Hello, world",
               "How do I sort a list in Python?", "x" * 3000]
    prompts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]
    return prompts


def test_hashing_words_are_the_regex_words_of_the_lowercased_prompt():
    for prompt in fuzz_prompts(2000):
        expected = [w.encode("utf-8") for w in re.findall(r"\w+", prompt.lower())]
        assert _words(prompt) == expected, repr(prompt)


@pytest.mark.parametrize("dim", [384, 97, 8])
def test_hashing_equals_its_definition_alone_and_in_batches(dim):
    prompts = fuzz_prompts(300, seed=dim)
    expected = np.stack([reference_hashing(p, dim) for p in prompts])
    featuriser = HashingFeaturiser(dim)
    np.testing.assert_array_equal(featuriser.encode(prompts), expected)
    np.testing.assert_array_equal(np.stack([featuriser.encode_one(p) for p in prompts]), expected)
    np.testing.assert_array_equal(
        np.concatenate([featuriser.encode(prompts[i:i + 7]) for i in range(0, len(prompts), 7)]), expected)


# --- decisions: built without validation, encoded without pydantic ----------------------------

MODELS = ("small", "medium", "large")


def make_router(dim: int = 16, models=MODELS) -> Router:
    settings = Settings(models=models, featuriser=f"hashing://?dim={dim}")
    return Router(settings, featuriser_from_url(settings.featuriser), seed=0)


def requests_of_every_kind(dim: int = 16) -> list[RouteRequest]:
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=dim).astype(np.float32)
    return [
        RouteRequest(request_id="plain", prompt="How do I sort a list in Python?"),
        RouteRequest(request_id="pref", prompt="Write a haiku", preference=Preference(quality=3, cost=1)),
        RouteRequest(request_id="cands", prompt="Translate this", candidates=["large", "small"]),
        RouteRequest(request_id="one-cand", prompt="", candidates=["medium"]),
        RouteRequest(request_id="emb", embedding=embedding / np.linalg.norm(embedding)),
        RouteRequest(request_id="x" * 128, prompt="ünïcödé prompt ✓", budget_usd=0.5),
    ]


def assert_encodes_and_validates(decisions: list[RouteDecision]) -> None:
    for decision in decisions:
        raw = encode_decision(decision)
        assert raw == encode(decision)
        again = decode(RouteDecision, raw)  # everything model_construct skipped, validated
        assert encode(again) == raw
        RouteDecision.model_validate(decision.model_dump())


def test_constructed_decisions_encode_exactly_like_validated_ones():
    router = make_router()
    assert_encodes_and_validates(router.route(requests_of_every_kind()))  # cold start, no prices
    router.apply_specs([ModelSpec(model="small", price=0.25), ModelSpec(model="large", price=3.0),
                        ModelSpec(model="xl", price=7)])
    decisions = router.route(requests_of_every_kind() * 20)
    assert {d.price for d in decisions} - {None} and None in {d.price for d in decisions}
    assert_encodes_and_validates(decisions)
    router.apply_specs([ModelSpec(model="small", enabled=False)])
    assert_encodes_and_validates(router.route(requests_of_every_kind()[:3]))


def test_the_fast_encoder_knows_every_field_of_a_decision():
    assert worker_module._FAST_ENCODE  # else it falls back to schemas.encode: correct, slower


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5, 0.0, -0.1])
def test_a_policy_output_that_is_no_distribution_is_refused(monkeypatch, bad):
    router = make_router()
    policy = router.model.policy
    decide = policy.decide

    def broken(x, w_quality, allowed=None, rng=None):
        choice = decide(x, w_quality, allowed, rng=rng)
        distribution = choice.distribution.copy()
        distribution[choice.arm if bad <= 0.0 else (choice.arm + 1) % len(distribution)] = bad
        return Choice(choice.arm, distribution)

    monkeypatch.setattr(policy, "decide", broken)
    with pytest.raises(ValueError):
        router.route(requests_of_every_kind()[:1])


def test_a_featuriser_vector_with_nan_is_refused(monkeypatch):
    router = make_router()
    encode_prompts = router.featuriser.encode
    monkeypatch.setattr(router.featuriser, "encode",
                        lambda prompts: encode_prompts(prompts) * np.float32(np.nan))
    with pytest.raises(ValueError):
        router.route(requests_of_every_kind()[:2])


@pytest.mark.parametrize("name", ["", "f" * (MAX_NAME + 1)])
def test_names_no_decision_may_carry_are_refused(monkeypatch, name):
    router = make_router()  # the registry refuses such model names itself; not so a featuriser's
    monkeypatch.setattr(router.featuriser, "name", name)
    with pytest.raises(ValueError):
        router.route(requests_of_every_kind()[:1])
