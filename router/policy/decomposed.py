"""The preference-decomposed policy: per arm, online ridge estimates of quality and of cost.

For each arm ``a`` it keeps the sufficient statistics of two Bayesian linear regressions on
the (sketched) prompt features z = [S x, 1]: ``A_a = lambda*I + sum z z^T``, ``b_a = sum q z``
and ``c_a = sum cost z``. A decision scores each arm for the request's own preference

    score_a = w_q * q_a - w_c * min(cost_a / tau, 1)

so one model serves every preference exactly. Exploration samples q_a and cost_a from their
posteriors (Thompson sampling) or takes optimistic bounds (UCB). Because only sums are kept,
the learner's state is exactly reproducible: the same outcomes in the same order give
bit-identical arrays, whatever crashed in between.

>>> import numpy as np
>>> policy = DecomposedPolicy(["small", "large"], dim=4, tau=0.01, seed=0)
>>> x = np.array([1.0, 0.0, 0.0, 0.0])
>>> for _ in range(50):
...     policy.learn(0, x, quality=0.5, cost_usd=0.0001)
...     policy.learn(1, x, quality=0.9, cost_usd=0.0090)
>>> [policy.arms[a] for a in policy.greedy(x[None, :], w_quality=1.0)]
['large']
>>> [policy.arms[a] for a in policy.greedy(x[None, :], w_quality=0.5)]
['small']
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from router.policy.base import Choice, RoutingPolicy

Exploration = Literal["ts", "ucb"]


class DecomposedPolicy(RoutingPolicy):
    """Preference-decomposed contextual bandit (BaRP's reward, learned per objective).

    Parameters
    ----------
    arms, dim, tau
        Model names, the featuriser's dimension, and the cost cap in USD.
    exploration
        ``"ts"`` (Thompson sampling) or ``"ucb"``.
    sketch_dim
        Features are projected to this many dimensions by a fixed random matrix (seeded by
        ``sketch_seed``) before learning; ``None`` or a value >= dim keeps them as they are.
        The projection keeps snapshots and decisions small: the state is O(K * sketch_dim^2).
    prior
        Ridge strength lambda (the prior precision of every weight).
    scale
        Posterior scale of the quality estimate (TS) or the UCB width, in quality units.
    cost_scale
        The same for the cost estimate, in USD.
    epsilon
        Share of uniform exploration mixed into every distribution: every offered arm keeps
        a propensity of at least epsilon / K, which off-policy evaluation needs.
    samples
        Posterior draws used to compute the Thompson-sampling action distribution.
    """

    def __init__(
        self,
        arms: list[str],
        dim: int,
        tau: float = 0.01,
        exploration: Exploration = "ts",
        sketch_dim: int | None = 128,
        sketch_seed: int = 0,
        prior: float = 1.0,
        scale: float = 0.25,
        cost_scale: float | None = None,
        epsilon: float = 0.02,
        samples: int = 128,
        seed: int | None = None,
    ) -> None:
        super().__init__(arms, dim, tau)
        if exploration not in ("ts", "ucb"):
            raise ValueError(f"exploration must be 'ts' or 'ucb', got {exploration!r}")
        self.exploration = exploration
        self.name = f"decomposed-{exploration}"
        self.sketch_dim = sketch_dim if sketch_dim and sketch_dim < dim else None
        self.sketch_seed = sketch_seed
        self.prior = float(prior)
        self.scale = float(scale)
        self.cost_scale = float(cost_scale) if cost_scale is not None else 0.25 * tau
        self.epsilon = float(epsilon)
        self.samples = int(samples)
        self.rng = np.random.default_rng(seed)
        self._sketch = self._make_sketch()
        n_features = (self.sketch_dim or dim) + 1  # + intercept
        K = len(arms)
        self.A = np.tile(np.eye(n_features) * self.prior, (K, 1, 1))
        self.b_quality = np.zeros((K, n_features))
        self.b_cost = np.zeros((K, n_features))
        self.counts = np.zeros(K, dtype=np.int64)
        self._derived: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def n_features(self) -> int:
        return self.A.shape[1]

    def _make_sketch(self) -> np.ndarray | None:
        if self.sketch_dim is None:
            return None
        # Gaussian JL projection scaled so that inner products are preserved in expectation.
        rng = np.random.default_rng(self.sketch_seed)
        return rng.standard_normal((self.dim, self.sketch_dim)) / np.sqrt(self.sketch_dim)

    def features(self, X: np.ndarray) -> np.ndarray:
        """The learning features z = [S x, 1] for each row of ``X`` (n, dim) or one ``x``."""
        X = np.asarray(X, dtype=np.float64)
        if X.shape[-1] != self.dim:
            raise ValueError(f"features have dimension {X.shape[-1]}, the policy expects {self.dim}")
        Z = X @ self._sketch if self._sketch is not None else X
        return np.concatenate([Z, np.ones(Z.shape[:-1] + (1,))], axis=-1)

    # Learning: sums only, so that the state is exactly reproducible.

    def learn(self, arm: int, x: np.ndarray, quality: float, cost_usd: float) -> None:
        z = self.features(x)
        self.A[arm] += np.outer(z, z)
        self.b_quality[arm] += quality * z
        self.b_cost[arm] += cost_usd * z
        self.counts[arm] += 1
        self.n_updates += 1
        self._derived = None

    def add_arm(self, name: str) -> None:
        """Add a candidate model at run time; it starts from the prior."""
        if name in self.arms:
            raise ValueError(f"arm {name!r} exists")
        d = self.n_features
        self.arms.append(name)
        self.A = np.concatenate([self.A, np.eye(d)[None] * self.prior])
        self.b_quality = np.concatenate([self.b_quality, np.zeros((1, d))])
        self.b_cost = np.concatenate([self.b_cost, np.zeros((1, d))])
        self.counts = np.append(self.counts, 0)
        self._derived = None

    # Estimates: derived from the sums when first needed after a change.

    def estimates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(theta_quality, theta_cost, A^-1): per-arm posterior means and covariances."""
        if self._derived is None:
            A_inv = np.linalg.inv(self.A)
            theta_q = np.einsum("kij,kj->ki", A_inv, self.b_quality)
            theta_c = np.einsum("kij,kj->ki", A_inv, self.b_cost)
            self._derived = (theta_q, theta_c, A_inv)
        return self._derived

    def prepare(self) -> None:
        self.estimates()

    def _scores(self, q: np.ndarray, c: np.ndarray, w_quality: float) -> np.ndarray:
        return w_quality * q - (1.0 - w_quality) * np.minimum(np.maximum(c, 0.0) / self.tau, 1.0)

    def decide(self, x, w_quality, allowed=None, rng=None) -> Choice:
        rng = rng or self.rng
        theta_q, theta_c, A_inv = self.estimates()
        K, D = A_inv.shape[0], A_inv.shape[1]
        z = self.features(x)
        mean_q, mean_c = theta_q @ z, theta_c @ z
        # One (K*D, D) product for every arm's posterior variance z^T A_k^-1 z.
        width = np.sqrt(np.maximum((A_inv.reshape(K * D, D) @ z).reshape(K, D) @ z, 0.0))
        offered = np.ones(K, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
        if not offered.any():
            raise ValueError("no arm is offered")
        if self.exploration == "ts":
            noise = rng.standard_normal((2, self.samples, K))
            scores = self._scores(mean_q + (self.scale * width) * noise[0],
                                  mean_c + (self.cost_scale * width) * noise[1], w_quality)
            scores[:, ~offered] = -np.inf
            greedy_share = np.bincount(scores.argmax(axis=1), minlength=K) / self.samples
        else:
            scores = self._scores(mean_q + self.scale * width, mean_c - self.cost_scale * width, w_quality)
            scores[~offered] = -np.inf
            greedy_share = np.zeros(K)
            greedy_share[int(scores.argmax())] = 1.0
        distribution = (1.0 - self.epsilon) * greedy_share + self.epsilon * offered / offered.sum()
        # The arm is drawn from exactly the distribution that is logged: propensities are exact.
        # (Inverse CDF by hand: rng.choice validates p at several times the cost.)
        cdf = np.cumsum(distribution)
        arm = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), K - 1)
        return Choice(arm=arm, distribution=distribution)

    def expected_rewards(self, X, w_quality) -> np.ndarray:
        """(n, K) reward estimates w_q * q_hat - w_c * min(c_hat / tau, 1) for rows of ``X``."""
        theta_q, theta_c, _ = self.estimates()
        Z = self.features(np.atleast_2d(X))
        return self._scores(Z @ theta_q.T, Z @ theta_c.T, w_quality)

    def greedy(self, X, w_quality, allowed=None) -> np.ndarray:
        scores = self.expected_rewards(X, w_quality)
        if allowed is not None:
            scores = np.where(allowed, scores, -np.inf)
        return scores.argmax(axis=1)

    # State, for snapshots: the sums and the hyperparameters, nothing derived.

    def params(self) -> dict[str, float | int | str]:
        return {
            "exploration": self.exploration,
            "tau": self.tau,
            "sketch_dim": self.sketch_dim or 0,
            "sketch_seed": self.sketch_seed,
            "prior": self.prior,
            "scale": self.scale,
            "cost_scale": self.cost_scale,
            "epsilon": self.epsilon,
            "samples": self.samples,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        # A is symmetric: its upper triangle is the whole of it, at half the size.
        upper = np.triu_indices(self.n_features)
        return {"A_upper": self.A[:, upper[0], upper[1]], "b_quality": self.b_quality,
                "b_cost": self.b_cost, "counts": self.counts}

    @classmethod
    def from_state(cls, arms, dim, params, arrays, n_updates, seed=None) -> DecomposedPolicy:
        policy = cls(
            list(arms), dim,
            tau=float(params["tau"]),
            exploration=str(params["exploration"]),  # type: ignore[arg-type]
            sketch_dim=int(params["sketch_dim"]) or None,
            sketch_seed=int(params["sketch_seed"]),
            prior=float(params["prior"]),
            scale=float(params["scale"]),
            cost_scale=float(params["cost_scale"]),
            epsilon=float(params["epsilon"]),
            samples=int(params["samples"]),
            seed=seed,
        )
        expected = {k: v.shape for k, v in policy.arrays().items()}
        got = {k: np.asarray(v).shape for k, v in arrays.items()}
        if expected != got:
            raise ValueError(f"state arrays {got} do not fit the policy {expected}")
        upper = np.triu_indices(policy.n_features)
        policy.A = np.empty_like(policy.A)
        policy.A[:, upper[0], upper[1]] = arrays["A_upper"]
        policy.A[:, upper[1], upper[0]] = arrays["A_upper"]
        policy.b_quality = np.array(arrays["b_quality"], dtype=np.float64)
        policy.b_cost = np.array(arrays["b_cost"], dtype=np.float64)
        policy.counts = np.array(arrays["counts"], dtype=np.int64)
        policy.n_updates = int(n_updates)
        return policy
