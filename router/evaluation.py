"""Full-information offline evaluation of routing choices at one preference.

A :class:`~router.datasets.RoutingDataset` records every model's outcome on every prompt,
so any policy's choices can be scored exactly, and so can the reference points a learned
router is judged against: each single model, uniform random choice, the cheapest model and
the per-prompt oracle. The reward is BaRP's (:func:`schemas.reward.reward`),

    r = w_q * q - (1 - w_q) * min(c / tau, 1),

and every figure is a mean over prompts.

>>> from router.datasets import synthetic_dataset
>>> world = synthetic_dataset(n=500).test()
>>> table = baselines(world, w_quality=0.8, tau=0.01)
>>> table["oracle"].reward >= max(s.reward for name, s in table.items() if name != "oracle")
True
>>> chosen = np.zeros(len(world), dtype=int)  # always the first model
>>> first_model = score_choices(world, chosen, 0.8, 0.01)
>>> bool(np.isclose(first_model.reward, table[world.models[0]].reward))
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from router.datasets import RoutingDataset
from schemas.reward import reward

RANDOM, CHEAPEST, ORACLE = "random", "cheapest", "oracle"


@dataclass
class PolicyScore:
    """Mean reward, quality and USD cost per prompt; ``coverage`` is the share of prompts scored.

    Coverage is below 1 only for a single model that lacks records on some prompts: its
    means are over the prompts where it has one.
    """

    reward: float
    quality: float
    cost_usd: float
    coverage: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def rewards(quality, cost, w_quality: float, tau: float) -> np.ndarray:
    """BaRP reward elementwise, NaN where quality or cost is missing (NaN).

    >>> rewards(np.array([1.0, np.nan]), np.array([0.005, 0.001]), 0.8, 0.01).round(6).tolist()
    [0.7, nan]
    """
    _check_preference(w_quality, tau)
    quality = np.asarray(quality, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    available = np.isfinite(quality) & np.isfinite(cost)
    return np.where(available, reward(quality, cost, w_quality, tau), np.nan)


def score_choices(dataset: RoutingDataset, choices, w_quality: float, tau: float) -> PolicyScore:
    """Score one chosen model index per prompt; choosing a model with no record is a ValueError."""
    choices = np.asarray(choices)
    if choices.shape != (len(dataset),) or not np.issubdtype(choices.dtype, np.integer):
        raise ValueError(
            f"choices must be {len(dataset)} integer model indices, got {choices.dtype} of shape {choices.shape}"
        )
    if len(dataset) == 0:
        raise ValueError("cannot score choices on an empty dataset")
    if choices.min() < 0 or choices.max() >= len(dataset.models):
        raise ValueError(f"choices must be model indices in [0, {len(dataset.models)})")
    rows = np.arange(len(dataset))
    unavailable = np.flatnonzero(~dataset.available[rows, choices])
    if unavailable.size:
        first = unavailable[0]
        raise ValueError(
            f"{unavailable.size} choices name a model with no recorded outcome, first prompt {first} "
            f"(id {str(dataset.ids[first])!r}) chose {dataset.models[choices[first]]!r}"
        )
    quality, cost = dataset.quality[rows, choices], dataset.cost[rows, choices]
    return PolicyScore(
        reward=float(rewards(quality, cost, w_quality, tau).mean()),
        quality=float(quality.mean()),
        cost_usd=float(cost.mean()),
    )


def baselines(
    dataset: RoutingDataset,
    w_quality: float,
    tau: float,
    reference: RoutingDataset | None = None,
) -> dict[str, PolicyScore]:
    """Reference policies at one preference, keyed by name.

    - each model's name: that model alone, scored over the prompts where it has a record
      (no fallback to another model); ``coverage`` says on what share of prompts that is;
    - ``"random"``: uniform choice among the models available on each prompt, its exact
      expectation (no sampling);
    - ``"cheapest"``: models ordered once by mean cost on ``reference``, each prompt routed to
      the first available one;
    - ``"oracle"``: on each prompt the available model with the highest reward at this
      preference, the cheaper one on ties (at w_q = 1 cost does not enter the reward).

    ``reference`` defaults to the train prompts of ``dataset``, or to all of it when it has
    none (e.g. ``dataset.test()``: pass ``reference=full.train()`` to keep test costs out).
    """
    available = dataset.available
    if len(dataset) == 0 or not available.any(axis=1).all():
        raise ValueError("baselines need a non-empty dataset with at least one model available per prompt")
    reward_matrix = rewards(dataset.quality, dataset.cost, w_quality, tau)
    quality = np.where(available, dataset.quality, 0.0)
    cost = np.where(available, dataset.cost, 0.0)
    covered = available.sum(axis=0)

    table: dict[str, PolicyScore] = {}
    with np.errstate(invalid="ignore", divide="ignore"):  # a model with no record at all scores NaN
        for k, model in enumerate(dataset.models):
            table[model] = PolicyScore(
                reward=float(np.where(available[:, k], reward_matrix[:, k], 0.0).sum() / covered[k]),
                quality=float(quality[:, k].sum() / covered[k]),
                cost_usd=float(cost[:, k].sum() / covered[k]),
                coverage=float(covered[k] / len(dataset)),
            )

    per_prompt = available.sum(axis=1)
    table[RANDOM] = PolicyScore(
        reward=float((np.where(available, reward_matrix, 0.0).sum(axis=1) / per_prompt).mean()),
        quality=float((quality.sum(axis=1) / per_prompt).mean()),
        cost_usd=float((cost.sum(axis=1) / per_prompt).mean()),
    )
    table[CHEAPEST] = score_choices(dataset, _cheapest_choices(dataset, reference), w_quality, tau)
    table[ORACLE] = score_choices(dataset, _oracle_choices(dataset, reward_matrix), w_quality, tau)
    return table


def _cheapest_choices(dataset: RoutingDataset, reference: RoutingDataset | None) -> np.ndarray:
    if reference is None:
        train = dataset.train()
        reference = train if len(train) else dataset
    mean_cost = {}
    for k, model in enumerate(reference.models):
        recorded = reference.available[:, k]
        mean_cost[model] = reference.cost[recorded, k].mean() if recorded.any() else np.inf
    # Models the reference never saw go last, in the dataset's order.
    order = sorted(range(len(dataset.models)), key=lambda k: mean_cost.get(dataset.models[k], np.inf))
    ranked_available = dataset.available[:, order]
    return np.asarray(order)[ranked_available.argmax(axis=1)]


def _oracle_choices(dataset: RoutingDataset, reward_matrix: np.ndarray) -> np.ndarray:
    best = np.nanmax(reward_matrix, axis=1, keepdims=True)
    cost_among_best = np.where(reward_matrix == best, dataset.cost, np.inf)
    return cost_among_best.argmin(axis=1)


def _check_preference(w_quality: float, tau: float) -> None:
    if not 0.0 <= w_quality <= 1.0:
        raise ValueError(f"w_quality must be in [0, 1], got {w_quality}")
    if not tau > 0.0:
        raise ValueError(f"tau must be > 0, got {tau}")
