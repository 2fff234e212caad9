"""Full-information evaluation: the reward, scoring choices and the baselines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from router.datasets import RoutingDataset, load_dataset, synthetic_dataset
from router.evaluation import PolicyScore, baselines, rewards, score_choices

ROUTERBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "routerbench-0shot"
needs_routerbench = pytest.mark.skipif(not ROUTERBENCH.is_dir(), reason="RouterBench data not present")
TAU = 0.01
PREFERENCES = (0.0, 0.2, 0.5, 0.8, 1.0)
POLICIES = ("random", "cheapest", "oracle")


@pytest.fixture(scope="module")
def routerbench() -> RoutingDataset:
    return load_dataset(ROUTERBENCH)


def tiny_dataset() -> RoutingDataset:
    """Three prompts, two models; model b has no record on the second prompt."""
    return RoutingDataset(
        name="tiny",
        models=("a", "b"),
        ids=np.array(["p0", "p1", "p2"]),
        prompts=["x", "y", "z"],
        tasks=np.array(["t", "t", "t"]),
        split=np.array(["train", "test", "test"]),
        quality=np.array([[1.0, 0.0], [0.0, np.nan], [1.0, 1.0]]),
        cost=np.array([[0.02, 0.001], [0.004, 0.001], [0.005, 0.001]]),
    )


def test_rewards_follow_the_barp_formula_and_mark_missing_outcomes():
    quality = np.array([1.0, 0.0, 1.0, np.nan, 1.0])
    cost = np.array([0.005, 0.0, 0.05, 0.001, np.nan])
    np.testing.assert_allclose(rewards(quality, cost, 0.8, TAU), [0.8 - 0.2 * 0.5, 0.0, 0.8 - 0.2, np.nan, np.nan])
    with pytest.raises(ValueError, match="w_quality"):
        rewards(quality, cost, 1.2, TAU)
    with pytest.raises(ValueError, match="tau"):
        rewards(quality, cost, 0.5, 0.0)


def test_score_choices_means_and_errors():
    dataset = tiny_dataset()
    score = score_choices(dataset, np.array([1, 0, 1]), 0.5, TAU)
    expected_rewards = [0.0 - 0.5 * 0.1, 0.0 - 0.5 * 0.4, 0.5 - 0.5 * 0.1]
    assert score.reward == pytest.approx(np.mean(expected_rewards))
    assert (score.quality, score.cost_usd) == (pytest.approx(1 / 3), pytest.approx(0.006 / 3))
    assert score.to_dict() == {"reward": score.reward, "quality": score.quality, "cost_usd": score.cost_usd, "coverage": 1.0}
    with pytest.raises(ValueError, match=r"first prompt 1 \(id 'p1'\) chose 'b'"):
        score_choices(dataset, np.array([0, 1, 0]), 0.5, TAU)
    with pytest.raises(ValueError, match="model indices"):
        score_choices(dataset, np.array([0, 2, 0]), 0.5, TAU)
    with pytest.raises(ValueError, match="integer"):
        score_choices(dataset, np.array([0.0, 0.0, 0.0]), 0.5, TAU)


def test_baselines_on_a_hand_checked_dataset():
    dataset = tiny_dataset()
    table = baselines(dataset, 1.0, TAU)
    # Model b is scored only where it has a record: prompts 0 and 2.
    assert table["b"] == PolicyScore(reward=0.5, quality=0.5, cost_usd=0.001, coverage=pytest.approx(2 / 3))
    assert table["a"].coverage == 1.0 and table["a"].quality == pytest.approx(2 / 3)
    # Random: prompt 0 averages a and b, prompt 1 has only a, prompt 2 averages a and b.
    assert table["random"].quality == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # Cheapest by mean cost on the train prompt (b), else a where b has no record.
    assert table["cheapest"].cost_usd == pytest.approx((0.001 + 0.004 + 0.001) / 3)
    # Oracle at w_q = 1: a on prompt 0, a on prompt 1, and the cheaper b on the tie at prompt 2.
    assert table["oracle"] == PolicyScore(
        reward=pytest.approx(2 / 3), quality=pytest.approx(2 / 3), cost_usd=pytest.approx((0.02 + 0.004 + 0.001) / 3)
    )


@needs_routerbench
def test_routerbench_test_split_matches_the_readme(routerbench):
    table = baselines(routerbench.test(), 1.0, TAU, reference=routerbench.train())
    gpt4, mistral = table["gpt-4-1106-preview"], table["mistralai/mistral-7b-chat"]
    assert gpt4.quality == pytest.approx(0.880, abs=0.001)
    assert gpt4.cost_usd == pytest.approx(0.0050, abs=0.00005)
    assert mistral.quality == pytest.approx(0.592, abs=0.001)
    assert mistral.cost_usd == pytest.approx(0.00008, abs=0.000005)
    single_models = [table[m].reward for m in routerbench.models]
    assert max(single_models) == pytest.approx(0.880, abs=0.001)
    assert table["oracle"].reward == pytest.approx(0.974, abs=0.001)
    # Ten models lack 6 test prompts and gpt-3.5 lacks 2 (RouterBench's split records).
    assert {m: round(table[m].coverage * 953) for m in routerbench.models} == {
        m: 951 if m == "gpt-3.5-turbo-1106" else 947 for m in routerbench.models
    }
    assert table["cheapest"].quality == pytest.approx(0.5929, abs=0.0001)


def check_oracle_dominates(dataset: RoutingDataset) -> None:
    # Single models are scored on the prompts where they have records, so compare them with
    # the oracle on the prompts where every model has one; random and cheapest cover all.
    fully_recorded = dataset.subset(dataset.available.all(axis=1))
    for w_quality in PREFERENCES:
        table = baselines(dataset, w_quality, TAU)
        assert table["oracle"].reward >= max(table["random"].reward, table["cheapest"].reward)
        on_common_prompts = baselines(fully_recorded, w_quality, TAU, reference=dataset)
        oracle = on_common_prompts.pop("oracle").reward
        assert all(oracle >= score.reward for score in on_common_prompts.values()), w_quality
        # And it attains the best recorded reward on every prompt.
        per_prompt = rewards(dataset.quality, dataset.cost, w_quality, TAU)
        assert table["oracle"].reward == pytest.approx(np.nanmax(per_prompt, axis=1).mean())


@needs_routerbench
def test_oracle_beats_every_policy_on_routerbench(routerbench):
    check_oracle_dominates(routerbench.test())


def test_oracle_beats_every_policy_on_the_synthetic_world():
    check_oracle_dominates(synthetic_dataset(n=1500).test())


@pytest.mark.parametrize("w_quality", [0.2, 0.8])
def test_random_is_the_exact_expectation_of_uniform_choice(w_quality):
    dataset = synthetic_dataset(n=600, n_models=4, seed=3)
    # Hide some outcomes so the number of available models varies by prompt.
    hidden = np.random.default_rng(0).random(dataset.quality.shape) < 0.3
    hidden[:, 0] = False
    dataset = replace(dataset, quality=np.where(hidden, np.nan, dataset.quality))
    exact = baselines(dataset, w_quality, TAU)["random"]

    rng = np.random.default_rng(1)
    available = dataset.available
    draws = []
    for _ in range(400):
        # A uniform pick among the available models: the argmax of random keys on them.
        keys = np.where(available, rng.random(available.shape), -1.0)
        draws.append(score_choices(dataset, keys.argmax(axis=1), w_quality, TAU))
    for field in ("reward", "quality", "cost_usd"):
        sampled = np.array([getattr(d, field) for d in draws])
        assert getattr(exact, field) == pytest.approx(sampled.mean(), abs=4 * sampled.std() / np.sqrt(len(draws)))


@needs_routerbench
def test_cheapest_takes_the_lowest_mean_cost_model_available(routerbench):
    test = routerbench.test()
    train_mean_cost = np.nanmean(np.where(routerbench.train().available, routerbench.train().cost, np.nan), axis=0)
    order = np.argsort(train_mean_cost, kind="stable")
    first_available = order[test.available[:, order].argmax(axis=1)]
    expected = score_choices(test, first_available, 0.5, TAU)
    assert baselines(test, 0.5, TAU, reference=routerbench.train())["cheapest"] == expected
    assert routerbench.models[order[0]] == "mistralai/mistral-7b-chat"
