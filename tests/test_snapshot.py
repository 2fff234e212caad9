"""Snapshots are verified data: checksummed, optionally signed, never applied when wrong."""

import numpy as np
import pytest

from router.featurise import featuriser_from_url
from router.policy import make_policy
from router.snapshot import SnapshotError, decode_snapshot, encode_snapshot
from router.worker import Router
from schemas import RouteRequest
from schemas.settings import Settings

ARMS = ["a", "b", "c"]


def learned_policy(dim=32, n=50):
    policy = make_policy("decomposed-ts", arms=ARMS, dim=dim, tau=0.01, seed=0)
    rng = np.random.default_rng(0)
    for i in range(n):
        policy.learn(i % 3, rng.standard_normal(dim), float(i % 2), 0.001 * (i % 3))
    return policy


def test_round_trip_keeps_the_exact_state_and_checksum():
    policy = learned_policy()
    frame = encode_snapshot(policy, version=3, outcomes_offset=41)
    decoded = decode_snapshot(frame)
    assert (decoded.header.version, decoded.header.outcomes_offset, decoded.header.n_updates) == (3, 41, 50)
    restored = decoded.policy()
    for name, array in policy.arrays().items():
        assert np.array_equal(restored.arrays()[name], array)
    assert decode_snapshot(encode_snapshot(restored, 3, 41)).header.sha256 == decoded.header.sha256


@pytest.mark.parametrize("mutate, reason", [
    (lambda f: f[:-1] + bytes([f[-1] ^ 1]), "bad_checksum"),
    (lambda f: b"XXXX" + f[4:], "bad_frame"),
    (lambda f: f[:20], "bad_frame"),
    (lambda f: f.replace(b'"decomposed-ts"', b'"pickle-please"'), "bad_header"),
])
def test_corrupted_frames_are_refused(mutate, reason):
    frame = encode_snapshot(learned_policy(), version=1, outcomes_offset=0)
    with pytest.raises(SnapshotError) as info:
        decode_snapshot(mutate(frame))
    assert info.value.reason in (reason, "unknown_policy", "bad_header")
    if reason != "bad_header":
        assert info.value.reason == reason


def test_signatures():
    policy = learned_policy()
    signed = encode_snapshot(policy, 1, 0, key=b"k1")
    assert decode_snapshot(signed, key=b"k1").header.signature
    with pytest.raises(SnapshotError, match="unsigned"):
        decode_snapshot(encode_snapshot(policy, 1, 0), key=b"k1")
    with pytest.raises(SnapshotError, match="bad_signature"):
        decode_snapshot(signed, key=b"k2")
    # The signature covers the header too: a rewritten version is refused.
    with pytest.raises(SnapshotError, match="bad_signature"):
        decode_snapshot(signed.replace(b'"version":1', b'"version":9'), key=b"k1")


def test_router_swaps_in_good_snapshots_and_keeps_the_last_good_one():
    featuriser = featuriser_from_url("hashing://?dim=32")
    settings = Settings(models=tuple(ARMS), snapshot_key="k1")
    router = Router(settings, featuriser, seed=0)
    request = RouteRequest(request_id="q1", prompt="hello there")
    cold = router.route([request])[0]
    assert cold.cold_start and cold.snapshot_version == 0

    policy = learned_policy()
    assert router.apply_snapshot(encode_snapshot(policy, 2, 10, key=b"k1"))
    assert not router.apply_snapshot(encode_snapshot(policy, 1, 5, key=b"k1"))  # older: ignored
    assert not router.apply_snapshot(encode_snapshot(policy, 3, 20))  # unsigned: refused
    assert not router.apply_snapshot(encode_snapshot(policy, 4, 20, key=b"wrong"))
    assert not router.apply_snapshot(b"garbage")
    assert router.stats.snapshots_stale == 1
    assert router.stats.refusals == {"unsigned": 1, "bad_signature": 1, "bad_frame": 1}
    warm = router.route([request])[0]
    assert (warm.snapshot_version, warm.cold_start) == (2, False)


def test_key_rotation_accepts_the_previous_key_and_signs_with_the_new_one():
    from router.snapshot import verification_keys

    policy = learned_policy()
    rotating = Settings(models=tuple(ARMS), snapshot_key="new", snapshot_previous_key="old")
    assert verification_keys(rotating) == (b"new", b"old")
    assert verification_keys(Settings()) == ()
    router = Router(rotating, featuriser_from_url("hashing://?dim=32"), seed=0)
    assert router.apply_snapshot(encode_snapshot(policy, 1, 0, key=b"old"))
    assert router.apply_snapshot(encode_snapshot(policy, 2, 0, key=b"new"))
    assert not router.apply_snapshot(encode_snapshot(policy, 3, 0, key=b"older"))
