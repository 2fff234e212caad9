"""The speed benchmarks produce every figure they promise (no timing is asserted: the machine is
shared), and the fast decision path is the policy's formula, bit for bit.
"""

import asyncio
import gc
import math

import numpy as np
import pytest

from deploy.bench_loop import HASHING, LoopBenchOptions, freshness, run_loop_bench, _Traffic
from router.bench.speed import run_speed_bench
from router.policy import DecomposedPolicy, make_policy
from router.policy.base import Choice

SPEED_KEYS = {"decision_p50_us", "decision_p99_us", "learner_updates_per_s", "peers", "snapshot_bytes",
              "snapshot_decode_ms", "encode_ms"}
PEER_KEYS = {"decision_p50_us", "decision_p99_us", "learner_updates_per_s"}
LOOP_KEYS = {"sustained_rps", "encoder_only_rps", "latency_ms", "freshness_ms", "rss_mb"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_speed_bench_reports_every_figure(tmp_path):
    path = tmp_path / "speed.json"
    report = run_speed_bench(path, arms=4, dim=32, decisions=50, updates=50, warm=40, peer_decisions=5,
                             peer_updates=5, peer_warm=5, peer_budget_s=5, snapshot_repeats=2,
                             featurisers=("hashing://?dim=32",), encode_singles=3, encode_batches=2,
                             progress=False)
    assert SPEED_KEYS <= report.keys() and path.exists()
    assert positive(report["decision_p50_us"]) and report["decision_p99_us"] >= report["decision_p50_us"]
    ours, machine = report["ours"], report["machine"]
    assert positive(ours["decision_cold_p50_us"]) and ours["decision_cold_p99_us"] >= ours["decision_cold_p50_us"]
    assert positive(machine["reference_p50_us"]) and machine["reference_p99_us"] >= machine["reference_p50_us"]
    assert positive(machine["timer_overhead_us"]) and 0 <= machine["time_lost_share"] < 1
    assert machine["pauses_over_20us_per_s"] >= 0
    assert positive(report["learner_updates_per_s"])
    assert "river-linucb" in report["peers"]  # River is a dependency; the others are optional
    for name, peer in report["peers"].items():
        assert PEER_KEYS <= peer.keys(), name
        assert all(positive(peer[key]) for key in PEER_KEYS), (name, peer)
        assert positive(peer["decision_p99_vs_ours"])
    for optional in ("paretobandit", "vowpalwabbit"):
        assert optional in report["peers"] or "skipped" in report["skipped"][optional]
    # K = 4 arms of 33 features (sketch off below 128 dims): A's upper triangle and two b's, float64.
    assert report["snapshot_bytes"] > 4 * (33 * 34 // 2 + 2 * 33) * 8
    assert positive(report["snapshot_decode_ms"])
    figures = report["encode_ms"]["hashing://?dim=32"]
    assert positive(figures["single"]) and positive(figures["batch32_per_prompt"])


def reference_decide(policy: DecomposedPolicy, x, w_quality, allowed, rng) -> Choice:
    """The decision as the policy's docstring spells it out, with the plain numpy formulas."""
    theta_q, theta_c, A_inv = policy.estimates()
    K, D = A_inv.shape[0], A_inv.shape[1]
    z = policy.features(x)
    mean_q, mean_c = theta_q @ z, theta_c @ z
    width = np.sqrt(np.maximum((A_inv.reshape(K * D, D) @ z).reshape(K, D) @ z, 0.0))
    offered = np.ones(K, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if policy.exploration == "ts":
        noise = rng.standard_normal((2, policy.samples, K))
        scores = policy._scores(mean_q + (policy.scale * width) * noise[0],
                                mean_c + (policy.cost_scale * width) * noise[1], w_quality)
        scores[:, ~offered] = -np.inf
        share = np.bincount(scores.argmax(axis=1), minlength=K) / policy.samples
    else:
        scores = policy._scores(mean_q + policy.scale * width, mean_c - policy.cost_scale * width, w_quality)
        scores[~offered] = -np.inf
        share = np.zeros(K)
        share[int(scores.argmax())] = 1.0
    distribution = (1.0 - policy.epsilon) * share + policy.epsilon * offered / offered.sum()
    cdf = np.cumsum(distribution)
    arm = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), K - 1)
    return Choice(arm=arm, distribution=distribution)


def trained_pair(name: str, sketch_dim):
    rng = np.random.default_rng(3)
    kwargs = {} if sketch_dim == "default" else {"sketch_dim": sketch_dim}
    fast = make_policy(name, arms=[f"m{k}" for k in range(5)], dim=160, tau=0.01, seed=0, **kwargs)
    X = rng.standard_normal((400, 160)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for i, x in enumerate(X[:300]):
        fast.learn(i % 5, x, float(rng.random()), float(rng.random()) * 0.02)
    return fast, X, rng


@pytest.mark.parametrize("name", ["decomposed-ts", "decomposed-ucb", "pooled-ts", "pooled-ucb"])
@pytest.mark.parametrize("sketch_dim", ["default", None])
def test_fast_decide_is_the_formula_bit_for_bit(name, sketch_dim):
    policy, X, rng = trained_pair(name, sketch_dim)
    mine, theirs = np.random.default_rng(7), np.random.default_rng(7)
    for i, x in enumerate(X[300:]):
        allowed = None if i % 3 else rng.random(5) < 0.6
        if allowed is not None and not allowed.any():
            allowed[0] = True
        w = float(rng.random())
        expected = reference_decide(policy, x, w, allowed, theirs)
        got = policy.decide(x, w, allowed, rng=mine)
        assert got.arm == expected.arm and np.array_equal(got.distribution, expected.distribution)
        if i % 5 == 0:  # decisions between learns use the state of the moment
            policy.learn(got.arm, x, 0.5, 0.001)


@pytest.mark.parametrize("name", ["decomposed-ts", "pooled-ucb"])
def test_decisions_leave_nothing_for_the_garbage_collector(name):
    """The benchmark times decisions with the collector off: that hides no pause a decision causes."""
    policy, X, _ = trained_pair(name, "default")
    policy.prepare()
    allowed = np.ones(5, dtype=bool)
    policy.decide(X[0], 0.7, allowed)
    gc.disable()
    try:
        before = gc.get_count()[0]  # tracked objects allocated less those freed, by any thread
        for i in range(2000):
            policy.decide(X[i % len(X)], 0.7, allowed)
        # Every object a decision makes is freed with it (0 in a bare interpreter; the margin is
        # for other threads): one left per decision would count 2000.
        assert gc.get_count()[0] - before < 400
    finally:
        gc.enable()


def test_fast_learn_keeps_the_exact_sums():
    policy, X, _ = trained_pair("decomposed-ts", "default")
    A, b = policy.A.copy(), policy.b_quality.copy()
    policy.learn(2, X[0], 0.25, 0.003)
    z = policy.features(X[0])
    assert np.array_equal(policy.A[2], A[2] + np.outer(z, z))
    assert np.array_equal(policy.b_quality[2], b[2] + 0.25 * z)


@pytest.mark.parametrize("name", ["decomposed-ts", "decomposed-ucb", "pooled-ts", "pooled-ucb"])
@pytest.mark.parametrize("sketch_dim", ["default", None])
def test_prepared_decisions_match_the_float64_ones(name, sketch_dim):
    """After prepare() S x, the widths and the means are float32 products: the same decisions."""
    policy, X, rng = trained_pair(name, sketch_dim)
    exact = type(policy).from_state(policy.arms, policy.dim, policy.params(), policy.arrays(), policy.n_updates)
    policy.prepare()
    mine, theirs = np.random.default_rng(11), np.random.default_rng(11)
    same = 0
    for i, x in enumerate(X):
        allowed = None if i % 3 else rng.random(5) < 0.6
        if allowed is not None and not allowed.any():
            allowed[1] = True
        w = float(rng.random())
        got, expected = policy.decide(x, w, allowed, rng=mine), reference_decide(exact, x, w, allowed, theirs)
        same += got.arm == expected.arm and np.array_equal(got.distribution, expected.distribution)
        # Whatever the rounding, the distribution is a greedy share plus the exact floor.
        offered = np.ones(5, dtype=bool) if allowed is None else allowed
        assert np.all(got.distribution[offered] >= policy.epsilon / offered.sum())
        assert np.all(got.distribution[~offered] == 0) and got.distribution[got.arm] > 0
        assert abs(got.distribution.sum() - 1.0) < 1e-12
    assert same >= len(X) - 2  # a draw flips only when two scores tie to 1e-7


def scaled(policy: DecomposedPolicy, weight: float) -> DecomposedPolicy:
    """``policy``'s state as if every outcome had been seen ``weight`` times."""
    arrays = policy.arrays()
    prior = policy.prior * np.eye(policy.n_features)
    if hasattr(policy, "intercept_prior"):
        prior[-1, -1] = policy.intercept_prior
    prior = prior[np.triu_indices(policy.n_features)]
    arrays = {**arrays, "A_upper": prior + weight * (arrays["A_upper"] - prior),
              "b_quality": weight * arrays["b_quality"], "b_cost": weight * arrays["b_cost"]}
    return type(policy).from_state(policy.arms, policy.dim, policy.params(), arrays, policy.n_updates)


@pytest.mark.parametrize("name", ["decomposed-ucb", "pooled-ucb"])
@pytest.mark.parametrize("weight", [1, 10_000])
def test_prepared_products_stay_within_the_documented_bound(name, weight):
    """The bounds _Hot's docstring gives: z to 1e-6, the means to 1e-6 of |theta| |z|, the
    variances z^T A_k^-1 z to 1e-5 relative (up to ~600 thousand outcomes an arm here)."""
    rng = np.random.default_rng(5)
    policy = make_policy(name, arms=[f"m{k}" for k in range(11)], dim=384, tau=0.01, seed=0)
    X = rng.standard_normal((700, 384)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for i, x in enumerate(X[:600]):
        policy.learn(i % 11, x, float(rng.random()), float(rng.random()) * 0.02)
    policy = scaled(policy, weight)
    theta_q, theta_c, A_inv = policy.estimates()
    K, D = A_inv.shape[0], A_inv.shape[1]
    theta = np.concatenate([theta_q, theta_c])
    policy.prepare()
    for x in X[600:]:
        policy.decide(x, 0.8)
        scratch = policy._scratch()
        z = policy.features(x)
        assert np.abs(scratch.z32.astype(np.float64) - z).max() < 1e-6
        assert np.all(np.abs(scratch.means32 - theta @ z) < 1e-6 * (np.abs(theta) @ np.abs(z)))
        w2 = (A_inv.reshape(K * D, D) @ z).reshape(K, D) @ z
        assert np.all(np.abs(scratch.w2_32 - w2) < 1e-5 * w2)


@pytest.mark.parametrize("name", ["decomposed-ts", "pooled-ucb"])
def test_prepared_decisions_take_any_feature_dtype(name):
    """float64, float16 or list features decide as their float32 values do."""
    policy, X, _ = trained_pair(name, "default")
    policy.prepare()
    for x in X[300:340]:
        x16 = x.astype(np.float16)
        for given, as32 in ((x.astype(np.float64), x), (x16, x16.astype(np.float32)), (x.tolist(), x)):
            a = policy.decide(given, 0.6, rng=np.random.default_rng(1))
            b = policy.decide(as32, 0.6, rng=np.random.default_rng(1))
            assert a.arm == b.arm and np.array_equal(a.distribution, b.distribution)
    with pytest.raises(ValueError, match="dimension"):
        policy.decide(X[0][:10], 0.6)
    with pytest.raises(ValueError, match="no arm is offered"):
        policy.decide(X[0], 0.6, np.zeros(5, dtype=bool))


def test_freshness_pairs_each_reward_with_the_first_applied_snapshot_that_includes_it():
    traffic = _Traffic()
    traffic.rewarded_at = {"a": 10.0, "b": 10.5, "c": 11.0}
    traffic.outcome_offset = {"a": 5, "b": 6, "c": 9}
    traffic.snapshot_offsets = {1: 4, 2: 6, 3: 8}
    traffic.polls = [(10.2, 0), (10.4, 1), (10.9, 2), (11.5, 3)]
    delays, missing = freshness(traffic, ["a", "b", "c", "never"])
    assert delays == pytest.approx([0.9, 0.4]) and missing == 2


@pytest.mark.integration
async def test_loop_bench_reports_every_figure(settings, broker, tmp_path):
    options = LoopBenchOptions(featurisers=(HASHING,), duration_s=4.0, window=64, loads=(200, 1000),
                               latency_s=2.0, warmup_s=1.0, encoder_s=0.5, settle_s=10.0,
                               log_dir=str(tmp_path / "logs"), progress=False)
    live = settings.model_copy(update={"snapshot_every_n": 50, "snapshot_every_s": 1.0})
    path = tmp_path / "loop.json"
    report = await asyncio.to_thread(run_loop_bench, live, options, path, start_broker=False,
                                     broker_pid=broker.pid)
    assert LOOP_KEYS <= report.keys() and path.exists()
    assert positive(report["sustained_rps"][HASHING]) and positive(report["encoder_only_rps"][HASHING])
    for rate in ("200", "1000"):
        figures = report["latency_ms"][rate]
        assert positive(figures["p50"]) and figures["p99"] >= figures["p50"]
    assert positive(report["freshness_ms"]["p50"]) and report["freshness_ms"]["p99"] >= report["freshness_ms"]["p50"]
    rss = report["rss_mb"][HASHING]
    assert {"router", "feedback", "learner", "broker"} <= rss.keys()
    for worker in ("router", "feedback", "learner", "broker"):
        assert positive(rss[worker]["start"]) and positive(rss[worker]["end"]), worker
