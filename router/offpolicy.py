"""Off-policy evaluation: the value of a policy that never ran, from logged outcomes.

Every decision logs the propensity of its arm (router.policy draws the arm from exactly the
distribution it logs), so the outcomes topic is an unbiased record for importance weighting:

- IPS: mean of pi(a|x) / p * r;
- SNIPS: the same, normalised by the mean weight (lower variance, slightly biased);
- DR (doubly robust): a reward model's prediction for the candidate's choice, corrected by the
  weighted residual on the logged arm; the reward model is cross-fitted (trained on the other
  fold) so it never sees the outcome it corrects.

Each estimate carries a normal-approximation 95% interval. Candidates are deterministic:
a policy class trained on the logs (cross-fitted: each half is judged by the policy that
learned from the other half) or a fixed model::

    logs = LoggedOutcomes.from_outcomes(outcomes)
    estimates = evaluate(logs, Candidate.fixed("gpt-4"), tau=0.01)
    estimates["dr"].value, estimates["dr"].low, estimates["dr"].high
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from router.policy import make_policy
from schemas import Outcome
from schemas.reward import reward as barp_reward

Z95 = 1.959963984540054


@dataclass(frozen=True)
class LoggedOutcomes:
    """Outcomes as arrays: features X (n, d), arm index, propensity, quality, cost, w_quality."""

    arms: tuple[str, ...]
    X: np.ndarray
    arm: np.ndarray
    propensity: np.ndarray
    quality: np.ndarray
    cost: np.ndarray
    w_quality: np.ndarray

    @classmethod
    def from_outcomes(cls, outcomes: Iterable[Outcome]) -> LoggedOutcomes:
        outcomes = list(outcomes)
        if not outcomes:
            raise ValueError("no outcomes to evaluate")
        arms = tuple(sorted({o.model for o in outcomes} | {m for o in outcomes for m in o.distribution}))
        index = {a: i for i, a in enumerate(arms)}
        return cls(
            arms=arms,
            X=np.stack([o.features for o in outcomes]).astype(np.float64),
            arm=np.array([index[o.model] for o in outcomes]),
            propensity=np.array([o.propensity for o in outcomes]),
            quality=np.array([o.quality for o in outcomes]),
            cost=np.array([o.cost_usd for o in outcomes]),
            w_quality=np.array([o.preference.quality for o in outcomes]),
        )

    def __len__(self) -> int:
        return len(self.arm)

    def rewards(self, tau: float) -> np.ndarray:
        return barp_reward(self.quality, self.cost, self.w_quality, tau)


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Candidate:
    """A deterministic policy to evaluate: ``policy`` (a router.policy name) or a fixed ``model``."""

    policy: str | None = None
    model: str | None = None

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """``model:NAME`` for a fixed model, otherwise a policy name (router.policy.POLICIES)."""
        return cls(model=text.removeprefix("model:")) if text.startswith("model:") else cls(policy=text)

    def choices(self, logs: LoggedOutcomes, folds: np.ndarray, tau: float) -> np.ndarray:
        """The candidate's arm for every logged context (cross-fitted for a learned policy)."""
        if self.model is not None:
            if self.model not in logs.arms:
                raise ValueError(f"model {self.model!r} is not among the logged arms {list(logs.arms)}")
            return np.full(len(logs), logs.arms.index(self.model))
        choices = np.empty(len(logs), dtype=int)
        for fold in (0, 1):
            policy = _fit(self.policy, logs, folds != fold, tau)
            rows = np.flatnonzero(folds == fold)
            for w in np.unique(logs.w_quality[rows]):
                at_w = rows[logs.w_quality[rows] == w]
                choices[at_w] = policy.greedy(logs.X[at_w], float(w))
        return choices


def _fit(name: str, logs: LoggedOutcomes, rows: np.ndarray, tau: float):
    policy = make_policy(name, arms=list(logs.arms), dim=logs.X.shape[1], tau=tau, seed=0)
    for i in np.flatnonzero(rows):
        policy.learn(int(logs.arm[i]), logs.X[i], float(logs.quality[i]), float(logs.cost[i]))
    return policy


def _interval(samples: np.ndarray, value: float | None = None) -> Estimate:
    value = float(samples.mean()) if value is None else value
    half = Z95 * float(samples.std(ddof=1)) / np.sqrt(len(samples))
    return Estimate(value, value - half, value + half)


def cross_fitting_folds(n: int, seed: int = 0) -> np.ndarray:
    """Which of two folds each logged outcome belongs to."""
    return np.random.default_rng(seed).integers(0, 2, n)


def evaluate(logs: LoggedOutcomes, candidate: Candidate, tau: float, reward_model: str = "pooled-ucb",
             seed: int = 0) -> dict[str, Estimate]:
    """IPS, SNIPS and DR estimates of the candidate's mean reward at the logged preferences."""
    folds = cross_fitting_folds(len(logs), seed)
    chosen = candidate.choices(logs, folds, tau)
    r = logs.rewards(tau)
    w = (chosen == logs.arm) / logs.propensity  # the candidate is deterministic: pi is 0 or 1

    ips = _interval(w * r)
    if w.sum() > 0:
        snips_value = float((w * r).sum() / w.sum())
        # Delta method: the ratio estimator's influence function is w (r - V) / mean(w).
        snips = _interval(w * (r - snips_value) / w.mean() + snips_value, snips_value)
    else:  # no logged decision agrees with the candidate: SNIPS is undefined
        snips = Estimate(float("nan"), float("-inf"), float("inf"))

    predicted_chosen = np.empty(len(logs))
    predicted_logged = np.empty(len(logs))
    for fold in (0, 1):
        model = _fit(reward_model, logs, folds != fold, tau)
        rows = np.flatnonzero(folds == fold)
        for wq in np.unique(logs.w_quality[rows]):
            at_w = rows[logs.w_quality[rows] == wq]
            scores = model.expected_rewards(logs.X[at_w], float(wq))
            predicted_chosen[at_w] = scores[np.arange(len(at_w)), chosen[at_w]]
            predicted_logged[at_w] = scores[np.arange(len(at_w)), logs.arm[at_w]]
    dr = _interval(predicted_chosen + w * (r - predicted_logged))
    return {"ips": ips, "snips": snips, "dr": dr}
