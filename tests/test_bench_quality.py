"""The routing-quality benchmark harness and the BaRP policy (fast: synthetic data, hashing features)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router.bench import peers
from router.bench.embeddings import cache_path, cached_embeddings
from router.bench.quality import PREFERENCES, markdown_table, run_quality_bench
from router.datasets import synthetic_dataset
from router.evaluation import ORACLE
from router.policy.barp import BaRPPolicy
from schemas.settings import Settings

REQUIRED = {"policy", "protocol", "w_quality", "reward", "reward_std", "quality", "cost_usd"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    report = run_quality_bench(
        synthetic_dataset(n=240, seed=3), seeds=2, report=str(folder / "report.json"), plot=None,
        featuriser_url="hashing://?dim=64", passes=1, progress=False, cache_dir=str(folder / "cache"),
        markdown=str(folder / "table.md"),
    )
    return report, folder


def test_every_record_has_the_required_keys(bench):
    report, _ = bench
    assert report["results"]
    for record in report["results"]:
        assert REQUIRED <= set(record), record
        assert record["protocol"] in ("barp", "online")
        assert record["w_quality"] in PREFERENCES
    # The workers' default policy is one of those measured.
    assert report["default_policy"] == Settings().policy
    assert report["default_policy"] in {record["policy"] for record in report["results"]}


def test_both_protocols_cover_ours_barp_river_and_baselines(bench):
    report, _ = bench
    names = {(r["protocol"], r["policy"]) for r in report["results"]}
    for protocol in ("barp", "online"):
        for name in ("decomposed-ts", "decomposed-ucb", "barp", "river-epsilon-greedy", "river-ucb",
                     "river-thompson", "river-linucb", "oracle", "random", "cheapest",
                     "synthetic-model-0"):
            assert (protocol, name) in names, (protocol, name)
    assert ("barp", "knn (full-info)") in names and ("barp", "mlp (full-info)") in names
    status = peers.optional_peers()
    for peer in ("paretobandit", "vowpalwabbit"):
        if status[peer] is None:
            assert ("barp", peer) in names
        else:
            assert peer in report["skipped"]
    curves = report["curves"]
    assert curves and all(len(c["steps"]) == len(c["regret"]) == len(c["cumulative_reward"]) for c in curves)


def test_the_oracle_is_at_least_every_policy(bench):
    report, _ = bench
    for protocol in ("barp", "online"):
        for w in PREFERENCES:
            rows = [r for r in report["results"] if r["protocol"] == protocol and r["w_quality"] == w]
            oracle = next(r["reward"] for r in rows if r["policy"] == ORACLE)
            assert all(r["reward"] <= oracle + 1e-12 for r in rows), (protocol, w)


def test_json_and_markdown_are_written(bench):
    report, folder = bench
    on_disk = json.loads((folder / "report.json").read_text())
    assert on_disk["results"] == report["results"]
    table = (folder / "table.md").read_text()
    assert table == markdown_table(report)
    assert "| decomposed-ts |" in table and "protocol: barp" in table and "protocol: online" in table


def test_embeddings_are_cached_on_disk(tmp_path):
    prompts = ["one prompt", "another prompt"]
    first = cached_embeddings(prompts, "hashing://?dim=16", cache_dir=tmp_path, progress=False)
    path = cache_path(prompts, "hashing://?dim=16", "hashing-16", tmp_path)
    assert path.exists()
    np.save(path, first * 0 + 7)  # a hit reads the file, it does not re-encode
    assert (cached_embeddings(prompts, "hashing://?dim=16", cache_dir=tmp_path, progress=False) == 7).all()
    other = cache_path(["one prompt"], "hashing://?dim=16", "hashing-16", tmp_path)
    assert other != path


def test_barp_distribution_sums_to_one_and_respects_the_offer():
    policy = BaRPPolicy(["a", "b", "c"], dim=4, tau=0.01, seed=1)
    rng = np.random.default_rng(0)
    for w in (0.0, 0.3, 1.0):
        choice = policy.decide(rng.standard_normal(4), w, allowed=np.array([True, False, True]))
        assert np.isclose(choice.distribution.sum(), 1.0)
        assert choice.distribution[1] == 0.0 and choice.arm != 1
    probabilities = policy.action_distribution(rng.standard_normal((5, 4)), 0.5)
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def test_barp_reinforce_improves_reward_on_two_arms():
    # Arm 1 always answers correctly, arm 0 never; both free. REINFORCE must move to arm 1.
    policy = BaRPPolicy(["bad", "good"], dim=3, tau=0.01, seed=0, lr=0.01, entropy=0.001)
    x = np.array([1.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    before = policy.action_distribution(x[None], 1.0)[0, 1]
    for _ in range(300):
        arm = policy.decide(x, 1.0, rng=rng).arm
        policy.learn(arm, x, quality=float(arm == 1), cost_usd=0.0, w_quality=1.0)
    after = policy.action_distribution(x[None], 1.0)[0, 1]
    assert before < 0.7 and after > 0.95
    assert policy.greedy(x[None], 1.0).tolist() == [1]


def test_barp_state_round_trips():
    policy = BaRPPolicy(["a", "b"], dim=3, tau=0.01, seed=2)
    x = np.array([0.2, -0.1, 0.5])
    for arm in (0, 1, 1, 0):
        policy.decide(x, 0.6)
        policy.learn(arm, x, quality=1.0, cost_usd=0.001)
    copy = BaRPPolicy.from_state(policy.arms, policy.dim, policy.params(), policy.arrays(), policy.n_updates)
    assert np.allclose(copy.action_distribution(x[None], 0.6), policy.action_distribution(x[None], 0.6))


@pytest.mark.parametrize("kind", ["decomposed", "pooled"])
def test_incremental_inverses_match_the_policy(kind):
    from router.policy.decomposed import DecomposedPolicy
    from router.policy.pooled import PooledDecomposedPolicy

    rng = np.random.default_rng(5)
    plain_cls, fast_cls = {
        "decomposed": (DecomposedPolicy, peers.IncrementalDecomposedPolicy),
        "pooled": (PooledDecomposedPolicy, peers.IncrementalPooledPolicy),
    }[kind]
    plain = plain_cls(["a", "b", "c"], dim=8, sketch_dim=None, seed=0)
    fast = fast_cls(["a", "b", "c"], dim=8, sketch_dim=None, seed=0)
    for _ in range(40):
        x = rng.standard_normal(8)
        arm, quality = int(rng.integers(3)), float(rng.random() < 0.5)
        for policy in (plain, fast):
            policy.estimates()
            policy.learn(arm, x, quality, 0.001)
    X = rng.standard_normal((10, 8))
    assert np.allclose(plain.expected_rewards(X, 0.7), fast.expected_rewards(X, 0.7))


def test_river_linucb_burn_in_workaround():
    learner = peers.RiverLinUCB(["a", "b"], dim=8, tau=0.01, seed=0, sketch_dim=4, burn_in=1)
    assert learner.policy.burn_in == 1 and not learner.policy.reward_scaler
    x = np.ones(8) / np.sqrt(8)
    rng = np.random.default_rng(0)
    first = [learner.choose(x, 0.5, np.array([True, True]), rng)]
    learner.learn(first[0], x, 1.0, 0.001, 0.5)
    second = learner.choose(x, 0.5, np.array([True, True]), rng)
    assert {first[0], second} == {0, 1}  # the burn-in offers every arm once


def test_pooled_policy_shrinks_an_unseen_arm_to_the_pooled_mean():
    from router.policy.pooled import PooledDecomposedPolicy

    policy = PooledDecomposedPolicy(["seen", "unseen"], dim=4, tau=0.01, sketch_dim=None, seed=0)
    rng = np.random.default_rng(1)
    qualities = []
    for _ in range(200):
        x = rng.standard_normal(4) / 2
        q = float(rng.random() < 0.7)
        qualities.append(q)
        policy.learn(0, x, q, 0.002)
    theta_q, theta_c, _ = policy.estimates()
    assert np.isclose(theta_q[1, -1], np.mean(qualities)) and np.allclose(theta_q[1, :-1], 0.0)
    assert np.isclose(theta_c[1, -1], 0.002)


def test_pooled_policy_intercept_prior_round_trips():
    from router.policy.pooled import PooledDecomposedPolicy

    policy = PooledDecomposedPolicy(["a", "b"], dim=4, tau=0.01, sketch_dim=None, seed=0,
                                    prior=30.0, intercept_prior=0.1)
    assert policy.A[0, -1, -1] == 0.1 and policy.A[0, 0, 0] == 30.0
    x = np.array([0.5, 0.5, 0.5, 0.5])
    for i in range(30):
        policy.learn(i % 2, x * (i % 3), float(i % 2), 0.001)
    copy = PooledDecomposedPolicy.from_state(policy.arms, policy.dim, policy.params(), policy.arrays(),
                                             policy.n_updates)
    assert copy.intercept_prior == 0.1
    assert np.allclose(copy.expected_rewards(x[None], 0.7), policy.expected_rewards(x[None], 0.7))
