"""The preference-decomposed policy: valid distributions, brute-force ranking, River's interface."""

import numpy as np
import pytest

from router.policy import DecomposedPolicy, make_policy
from schemas.reward import reward

TAU = 0.01
# Four arms on one context: (quality, cost in USD). Each is best at some preference.
TRUTH = {"tiny": (0.40, 0.00005), "small": (0.62, 0.0004), "mid": (0.80, 0.002), "large": (0.97, 0.008)}


def trained(exploration: str, dim: int = 16) -> tuple[DecomposedPolicy, np.ndarray]:
    rng = np.random.default_rng(1)
    policy = make_policy(f"decomposed-{exploration}", arms=list(TRUTH), dim=dim, tau=TAU, seed=0)
    X = rng.standard_normal((400, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for x in X:
        for arm, (q, c) in enumerate(TRUTH.values()):
            policy.learn(arm, x, q, c)
    return policy, X


@pytest.mark.parametrize("exploration", ["ts", "ucb"])
def test_distribution_sums_to_one_and_respects_the_offer(exploration):
    policy, X = trained(exploration)
    allowed = np.array([True, False, True, True])
    for w in (1.0, 0.8, 0.5, 0.2, 0.0):
        for x in X[:20]:
            choice = policy.decide(x, w, allowed)
            assert choice.distribution.sum() == pytest.approx(1.0)
            assert choice.distribution[1] == 0.0
            assert choice.arm != 1
            assert choice.propensity == choice.distribution[choice.arm] > 0
            # The uniform floor keeps every offered arm loggable for off-policy evaluation.
            assert choice.distribution[allowed].min() >= policy.epsilon / allowed.sum() - 1e-12


@pytest.mark.parametrize("exploration", ["ts", "ucb"])
@pytest.mark.parametrize("w", [1.0, 0.8, 0.5, 0.2])
def test_decomposed_scores_rank_arms_as_the_brute_force_reward(exploration, w):
    policy, X = trained(exploration)
    truth = np.array([reward(q, c, w, TAU) for q, c in TRUTH.values()])
    scores = policy.expected_rewards(X[:5], w)
    for row in scores:
        assert np.argsort(-row).tolist() == np.argsort(-truth).tolist()
    assert (policy.greedy(X[:5], w) == truth.argmax()).all()


def test_thompson_sampling_explores_at_the_prior_and_exploits_once_learned():
    fresh = make_policy("decomposed-ts", arms=list(TRUTH), dim=16, tau=TAU, seed=0)
    x = np.ones(16) / 4
    assert fresh.decide(x, 1.0).distribution.max() < 0.6  # nothing is known: spread out
    policy, _ = trained("ts")
    assert policy.decide(x, 1.0).distribution[3] > 0.9  # 'large' is best on quality alone


def test_state_is_exactly_reproducible():
    a, _ = trained("ts")
    b, _ = trained("ts")
    for name, array in a.arrays().items():
        assert np.array_equal(array, b.arrays()[name])


def test_river_interface():
    policy, X = trained("ucb")
    assert policy.pull(["tiny", "small"], {"features": X[0], "w_quality": 1.0}) == "small"
    before = policy.counts.copy()
    policy.update("mid", {"features": X[0]}, quality=1.0, cost_usd=0.001)
    assert (policy.counts - before).tolist() == [0, 0, 1, 0]


def test_new_arm_starts_from_the_prior():
    policy, X = trained("ts")
    policy.add_arm("newcomer")
    assert policy.counts[-1] == 0
    assert policy.decide(X[0], 1.0).distribution.shape == (5,)


def test_feature_dimension_mismatch_is_a_clear_error():
    policy, _ = trained("ts")
    with pytest.raises(ValueError, match="dimension 3"):
        policy.decide(np.ones(3), 1.0)
