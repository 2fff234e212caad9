"""Off-policy estimates from logged propensities cover the true value of another policy.

RouterBench records every model's outcome, so the truth of any candidate is computable: log
a uniform-random router on it (bandit feedback only), then value candidates that never ran.
"""

import numpy as np
import pytest

from router.datasets import load_dataset
from router.featurise import featuriser_from_url
from router.offpolicy import Candidate, LoggedOutcomes, cross_fitting_folds, evaluate
from schemas import Outcome, Preference
from schemas.reward import reward

TAU = 0.01


@pytest.fixture(scope="module")
def world(data_dir):
    data = load_dataset(data_dir)
    data = data.subset(data.available.all(axis=1))  # every model has a record on every prompt
    X = featuriser_from_url("hashing://?dim=64").encode(data.prompts)
    rng = np.random.default_rng(7)
    K = len(data.models)
    logged = rng.integers(0, K, len(data))  # the logging policy: uniform random
    w_quality = rng.choice([1.0, 0.8, 0.5], len(data))
    outcomes = [
        Outcome(request_id=f"q{i}", model=data.models[a], features=X[i],
                preference=Preference(quality=w, cost=1 - w), propensity=1 / K,
                distribution={m: 1 / K for m in data.models}, quality=data.quality[i, a],
                cost_usd=data.cost[i, a], reward=reward(data.quality[i, a], data.cost[i, a], w, TAU),
                completion="joined", snapshot_version=0, decided_at=0.0, created_at=0.0)
        for i, (a, w) in enumerate(zip(logged, w_quality))
    ]
    logs = LoggedOutcomes.from_outcomes(outcomes)
    # LoggedOutcomes sorts arms by name; map the dataset's columns onto that order.
    columns = [data.models.index(arm) for arm in logs.arms]
    truth = reward(data.quality[:, columns], data.cost[:, columns], w_quality[:, None], TAU)
    return logs, truth


@pytest.mark.parametrize("candidate", ["model:gpt-4-1106-preview", "model:mistralai/mistral-7b-chat", "pooled-ucb"])
def test_every_estimate_covers_the_true_value(world, candidate):
    logs, truth = world
    chosen = Candidate.parse(candidate).choices(logs, cross_fitting_folds(len(logs)), TAU)
    true_value = float(truth[np.arange(len(logs)), chosen].mean())
    estimates = evaluate(logs, Candidate.parse(candidate), TAU)
    for name, estimate in estimates.items():
        assert estimate.low <= true_value <= estimate.high, (name, estimate, true_value)
    # The candidates differ from the logging policy: the uniform router's value is elsewhere.
    assert abs(float(truth.mean()) - true_value) > 0.02


def test_an_unknown_model_is_a_clear_error(world):
    logs, _ = world
    with pytest.raises(ValueError, match="not among the logged arms"):
        evaluate(logs, Candidate.parse("model:gpt-7"), TAU)
