"""The decomposed policy with an empirical-Bayes prior mean: shrink toward the pooled mean.

:class:`~router.policy.decomposed.DecomposedPolicy` is ridge regression per arm, whose
prior mean is zero: an arm with few outcomes is predicted near quality 0 and cost 0
wherever its data is thin. Under bandit feedback that is self-reinforcing: an expensive
model that most preferences avoid (gpt-4 under w_q ~ U[0, 1]) is tried rarely, so its
quality estimate stays shrunk toward 0, so it is never chosen even at w_q = 1. This policy
shrinks each arm toward the mean over *all* arms' outcomes instead (a hierarchical prior
whose mean is estimated from the pooled data):

    q_a(z) = q_bar + z^T A_a^-1 (b_a - q_bar * s_a),     s_a = sum of the arm's z,

which is ridge regression on the residuals q - q_bar, offset by q_bar; cost likewise with
c_bar. Everything it needs is already in the parent's state: ``s_a`` is the last column of
``A_a`` less the prior, and the pooled sums are the intercept entries of ``b``. Snapshots,
decisions (TS/UCB widths) and the learner are unchanged; an arm with no outcome predicts
q_bar and c_bar everywhere.

``intercept_prior`` sets the prior precision of the intercept apart from the feature
weights' (``prior``): a strong ``prior`` with a weak ``intercept_prior`` shrinks each arm's
dependence on the prompt toward its own mean (learned freely) rather than the whole
estimate toward q_bar, so the policy falls back to "the best model on average" where the
prompt features say little.

>>> import numpy as np
>>> policy = PooledDecomposedPolicy(["a", "b"], dim=2, tau=0.01, sketch_dim=None, seed=0)
>>> for _ in range(20):
...     policy.learn(0, np.array([1.0, 0.0]), quality=0.8, cost_usd=0.001)
>>> float(np.round(policy.expected_rewards(np.array([[0.0, 1.0]]), 1.0)[0, 1], 6))  # arm b: unseen
0.8
"""

from __future__ import annotations

import numpy as np

from router.policy.decomposed import DecomposedPolicy


class PooledDecomposedPolicy(DecomposedPolicy):
    """DecomposedPolicy whose per-arm estimates shrink toward the pooled mean quality and cost."""

    def __init__(self, *args, intercept_prior: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = f"pooled-{self.exploration}"
        self.intercept_prior = self.prior if intercept_prior is None else float(intercept_prior)
        self.A[:, -1, -1] = self.intercept_prior  # the prior, before any outcome

    def add_arm(self, name: str) -> None:
        super().add_arm(name)
        self.A[-1, -1, -1] = self.intercept_prior

    def params(self) -> dict[str, float | int | str]:
        return {**super().params(), "intercept_prior": self.intercept_prior}

    @classmethod
    def from_state(cls, arms, dim, params, arrays, n_updates, seed=None) -> PooledDecomposedPolicy:
        params = dict(params)
        intercept_prior = float(params.pop("intercept_prior", params["prior"]))
        # The parent rebuilds A from the arrays, so the constructor's prior does not matter.
        policy = super().from_state(arms, dim, params, arrays, n_updates, seed=seed)
        policy.intercept_prior = intercept_prior
        return policy

    def pooled_means(self) -> tuple[float, float]:
        """(q_bar, c_bar): the mean quality and cost over every outcome learned so far."""
        n = int(self.counts.sum())
        if n == 0:
            return 0.0, 0.0
        return float(self.b_quality[:, -1].sum() / n), float(self.b_cost[:, -1].sum() / n)

    def _thetas(self, A_inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q_bar, c_bar = self.pooled_means()
        s = self.A[:, :, -1].copy()  # prior * e_last + sum of z, per arm
        s[:, -1] -= self.intercept_prior
        intercept = np.zeros(self.n_features)
        intercept[-1] = 1.0
        theta_q = np.einsum("kij,kj->ki", A_inv, self.b_quality - q_bar * s) + q_bar * intercept
        theta_c = np.einsum("kij,kj->ki", A_inv, self.b_cost - c_bar * s) + c_bar * intercept
        return theta_q, theta_c

    def estimates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._derived is None:
            A_inv = np.linalg.inv(self.A)
            self._derived = (*self._thetas(A_inv), A_inv)
        return self._derived
