"""The interface every routing policy implements, on top of River's ContextualPolicy.

A routing policy serves any preference from one model: ``decide`` takes the request's own
quality weight, ``learn`` takes the chosen arm's quality and cost separately (not a scalar
reward), so the trade-off can be changed per request without retraining.

River's generic interface works too (``pull`` / ``update``), with the context as a dict::

    arm = policy.pull(policy.arms, {"features": x, "w_quality": 0.8})
    policy.update(arm, {"features": x}, quality=1.0, cost_usd=0.002)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
from river import bandit


@dataclass(frozen=True, slots=True)
class Choice:
    """One routing decision: the arm drawn and the distribution it was drawn from."""

    arm: int
    distribution: np.ndarray  # (K,), sums to one; zero for arms not offered

    @property
    def propensity(self) -> float:
        return float(self.distribution[self.arm])


class RoutingPolicy(bandit.base.ContextualPolicy, abc.ABC):
    """A contextual bandit over K named arms and d-dimensional prompt features."""

    #: Short name, carried by decisions and snapshots.
    name: str = "policy"

    def __init__(self, arms: list[str], dim: int, tau: float) -> None:
        super().__init__(burn_in=0)
        if len(set(arms)) != len(arms) or not arms:
            raise ValueError(f"arms must be distinct and non-empty, got {arms!r}")
        self.arms = list(arms)
        self.dim = int(dim)
        self.tau = float(tau)
        self.n_updates = 0

    @abc.abstractmethod
    def decide(
        self,
        x: np.ndarray,
        w_quality: float,
        allowed: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> Choice:
        """Draw an arm for features ``x`` (d,) at preference ``w_quality``.

        ``allowed`` is an optional (K,) bool mask of the arms this request may use.
        """

    @abc.abstractmethod
    def greedy(self, X: np.ndarray, w_quality: float, allowed: np.ndarray | None = None) -> np.ndarray:
        """The best arm by the current estimates, for each row of ``X`` (n, d): no exploration."""

    @abc.abstractmethod
    def learn(self, arm: int, x: np.ndarray, quality: float, cost_usd: float) -> None:
        """Learn from one outcome of ``arm`` on features ``x``."""

    def prepare(self) -> None:
        """Derive whatever decisions need from the state now, not at the first decision."""

    def set_price(self, arm: int, price: float) -> None:
        """Express what ``arm`` learned about its cost at a new ``price`` (see schemas.ModelSpec)."""
        raise NotImplementedError(f"policy {self.name} keeps no cost estimate to reprice")

    def clone(self) -> RoutingPolicy:
        """An independent copy with the same state (what a snapshot would restore)."""
        return type(self).from_state(self.arms, self.dim, self.params(), self.arrays(), self.n_updates)

    # River's interface, in terms of the above.

    def _pull(self, arm_ids, context):  # type: ignore[override]
        allowed = np.isin(self.arms, list(arm_ids))
        choice = self.decide(np.asarray(context["features"], dtype=np.float64),
                             float(context.get("w_quality", 1.0)), allowed)
        return self.arms[choice.arm]

    def update(self, arm_id, context, quality: float, cost_usd: float):  # type: ignore[override]
        self.learn(self.arms.index(arm_id), np.asarray(context["features"], dtype=np.float64),
                   quality, cost_usd)
